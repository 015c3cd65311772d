// Two isolated headless Chromium contexts open a WebRTC data channel through a TURN server only:
// each page's Signal-Fire client (/client/signal-fire.js) is given iceTransportPolicy 'relay',
// and its iceServers (TURN credentials) come from polysignal's welcome.
//
//   node turn_browser.mjs <http base of the node>
//
// Prints one JSON object as its last line: for each side its RTCConfiguration's policy and TURN
// urls, the candidate types it gathered, and its selected candidate pair (from getStats).
import { launchBrowser, isolatedContext } from './browser.mjs'

const base = process.argv[2]
const PAGE = '/turn-test.html'
const HTML = `<!doctype html><meta charset="utf-8"><title>turn test</title>
<script type="module">
  import * as sf from '/client/signal-fire.js'
  window.sf = sf
  // The selected candidate pair of pc's transport, and every local candidate's type.
  window.describe = async (pc) => {
    const stats = await pc.getStats()
    let pair = null
    const gathered = []
    for (const report of stats.values()) {
      if (report.type === 'local-candidate') gathered.push(report.candidateType)
      if (report.type === 'transport' && report.selectedCandidatePairId) {
        const selected = stats.get(report.selectedCandidatePairId)
        pair = {
          state: selected.state,
          local: stats.get(selected.localCandidateId).candidateType,
          remote: stats.get(selected.remoteCandidateId).candidateType
        }
      }
    }
    return { pair, gathered }
  }
  window.summary = async (client, pc) => ({
    policy: client.configuration.iceTransportPolicy,
    urls: client.configuration.iceServers.map(server => server.urls),
    ...(await window.describe(pc))
  })
  document.title = 'ready'
</script>`

async function openPage (browser) {
  const context = await isolatedContext(browser, base)
  const page = await context.newPage()
  const logs = []
  page.on('console', msg => logs.push(`${msg.type()}: ${msg.text()}`))
  page.on('pageerror', err => logs.push(`pageerror: ${err.message}`))
  await page.route(base + PAGE, route => route.fulfill({ contentType: 'text/html', body: HTML }))
  await page.goto(base + PAGE)
  await page.waitForFunction(() => document.title === 'ready', null, { timeout: 10000 })
  return { context, page, logs }
}

const url = base.replace(/^http/, 'ws') + '/signal-fire'
const browser = await launchBrowser()
const result = {}
let a, b
try {
  a = await openPage(browser)
  b = await openPage(browser)

  // B: accept the session, answer the first data-channel message with an echo.
  const bId = await b.page.evaluate(async (url) => {
    const client = await window.sf.connect(url, { iceTransportPolicy: 'relay' })
    window.client = client
    window.received = new Promise(resolve => {
      client.addEventListener('session', async (ev) => {
        const pc = await ev.detail.accept()
        window.pc = pc
        pc.addEventListener('datachannel', ({ channel }) => {
          channel.addEventListener('message', (m) => {
            channel.send('echo: ' + m.data)
            resolve(m.data)
          })
        })
      })
    })
    return client.id
  }, url)

  Object.assign(result, await a.page.evaluate(async ({ url, target }) => {
    const client = await window.sf.connect(url, { iceTransportPolicy: 'relay' })
    const session = await client.createSession(target)
    const { pc, reply } = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no echo within 15 s')), 15000)
      session.addEventListener('rejected', () => reject(new Error('rejected')))
      session.addEventListener('timed-out', () => reject(new Error('timed out')))
      session.addEventListener('accepted', (ev) => {
        const pc = ev.detail
        const channel = pc.createDataChannel('chat')
        channel.addEventListener('open', () => channel.send('hello through TURN'))
        channel.addEventListener('message', (m) => {
          clearTimeout(timer)
          resolve({ pc, reply: m.data })
        })
      })
    })
    return { reply, a: await window.summary(client, pc) }
  }, { url, target: bId }))

  result.receivedByB = await b.page.evaluate(() => window.received)
  result.b = await b.page.evaluate(() => window.summary(window.client, window.pc))
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err)
  result.logs = [...(a ? a.logs : []), ...(b ? b.logs : [])]
} finally {
  await browser.close()
}
console.log(JSON.stringify(result))
