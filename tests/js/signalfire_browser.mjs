// Two isolated headless Chromium contexts open a WebRTC data channel through polysignal's
// Signal-Fire protocol, using the browser client served at /client/signal-fire.js.
//
//   node signalfire_browser.mjs <http base of A's node> <http base of B's node>
//
// Each page is a small HTML page built here and served on its node's origin (so the module is
// loaded from polysignal itself). Prints one JSON object as its last line.
import { launchBrowser, isolatedContext } from './browser.mjs'

const [baseA, baseB] = [process.argv[2], process.argv[3] || process.argv[2]]
const PAGE = '/signal-fire-test.html'
const HTML = `<!doctype html><meta charset="utf-8"><title>signal-fire test</title>
<script type="module">
  import * as sf from '/client/signal-fire.js'
  window.sf = sf
  document.title = 'ready'
</script>`

async function openPage (browser, base) {
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

function wsUrl (base) {
  return base.replace(/^http/, 'ws') + '/signal-fire'
}

const browser = await launchBrowser()
const result = {}
let a, b
try {
  a = await openPage(browser, baseA)
  b = await openPage(browser, baseB)

  // B: accept the first session, answer every data-channel message with an echo.
  result.bId = await b.page.evaluate(async (url) => {
    const client = await window.sf.connect(url, { iceServers: [] })
    window.received = new Promise(resolve => {
      client.addEventListener('session', async (ev) => {
        window.sessionOrigin = ev.detail.origin
        const pc = await ev.detail.accept()
        pc.addEventListener('datachannel', ({ channel }) => {
          channel.addEventListener('message', (m) => {
            channel.send('echo: ' + m.data)
            resolve(m.data)
          })
        })
      })
    })
    // A second client on the same page turns every session down with a reason.
    const busy = await window.sf.connect(url, { iceServers: [] })
    busy.addEventListener('session', (ev) => ev.detail.reject('busy right now'))
    return [client.id, busy.id]
  }, wsUrl(baseB)).then(([bId, busyId]) => { result.busyId = busyId; return bId })

  // A: an unknown id is refused with the server's error, B's busy client rejects with a reason,
  // then a session to B carries a message both ways.
  Object.assign(result, await a.page.evaluate(async ({ url, target, busyId }) => {
    const client = await window.sf.connect(url, { iceServers: [] })
    let notFound = null
    try {
      await client.createSession('AAAAAAAAAAAAAAAAAAAAA')
    } catch (err) {
      notFound = err.message
    }
    const declined = await client.createSession(busyId)
    const rejectedWith = await new Promise((resolve, reject) => {
      setTimeout(() => reject(new Error('no rejection within 10 s')), 10000)
      declined.addEventListener('rejected', (ev) => resolve(ev.detail))
    })
    const session = await client.createSession(target)
    const reply = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no echo within 20 s')), 20000)
      session.addEventListener('rejected', () => reject(new Error('rejected')))
      session.addEventListener('timed-out', () => reject(new Error('timed out')))
      session.addEventListener('accepted', (ev) => {
        const pc = ev.detail
        const channel = pc.createDataChannel('chat')
        channel.addEventListener('open', () => channel.send('hello from A'))
        channel.addEventListener('message', (m) => { clearTimeout(timer); resolve(m.data) })
      })
    })
    return {
      aId: client.id, notFound, rejectedWith, reply, iceServers: client.configuration.iceServers
    }
  }, { url: wsUrl(baseA), target: result.bId, busyId: result.busyId }))

  result.receivedByB = await b.page.evaluate(() => window.received)
  result.sessionOrigin = await b.page.evaluate(() => window.sessionOrigin)
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err)
  result.logs = [...(a ? a.logs : []), ...(b ? b.logs : [])]
} finally {
  await browser.close()
}
console.log(JSON.stringify(result))
