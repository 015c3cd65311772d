// The /demo page of the rooms protocol in two isolated headless Chromium contexts: the owner's
// page creates a room, the joiner's page asks to join, the owner confirms in the page's own
// confirm() dialog, and the two pages open a WebRTC data channel and chat over it.
//
//   node rooms_demo_browser.mjs <owner's http base> <joiner's http base> <APP_PASS>
//
// The owner's page gets its app token through the page's own "Get token" form (POST /app); the
// joiner's through the #token= fragment. Prints one JSON object as its last line.
import { launchBrowser, isolatedContext } from './browser.mjs'

const [baseA, baseB, password] = process.argv.slice(2)
const room = `demo-${process.pid}`
const TIMEOUT = 20000

async function openDemo (browser, base, hash) {
  const context = await isolatedContext(browser, base)
  const page = await context.newPage()
  page.setDefaultTimeout(TIMEOUT)
  const logs = []
  page.on('console', (msg) => logs.push(`${msg.type()}: ${msg.text()}`))
  page.on('pageerror', (err) => logs.push(`pageerror: ${err.message}`))
  page.on('requestfailed', (req) => logs.push(`requestfailed: ${req.url()}`))
  await page.goto(`${base}/demo${hash}`)
  await page.waitForFunction(() => window.demo && typeof window.io === 'function', null, { timeout: TIMEOUT })
  await page.evaluate(() => window.demo.ready)
  return { context, page, logs }
}

async function signIn (page, name) {
  await page.fill('#name', name)
  await page.check('#media') // Chromium's fake camera and microphone (browser.mjs flags)
  await page.click('#connect')
  await page.waitForFunction(() => window.demo.session !== null, null, { timeout: TIMEOUT })
}

const browser = await launchBrowser()
const result = { room }
let owner, joiner
try {
  owner = await openDemo(browser, baseA, '')
  await owner.page.click('#token-box summary') // open "Get one from POST /app"
  await owner.page.fill('#app-pass', password)
  await owner.page.click('#get-token')
  await owner.page.waitForFunction(() => document.getElementById('token').value.length > 0, null, { timeout: TIMEOUT })
  const token = await owner.page.inputValue('#token')
  await signIn(owner.page, 'owner')

  // The owner answers the join request in the page's confirm() dialog.
  owner.page.on('dialog', async (dialog) => {
    result.dialog = dialog.message()
    await dialog.accept()
  })
  await owner.page.fill('#room', room)
  await owner.page.click('#create')
  await owner.page.waitForFunction((r) => window.demo.room === r, room, { timeout: TIMEOUT })

  joiner = await openDemo(browser, baseB, `#token=${encodeURIComponent(token)}&room=${room}`)
  await signIn(joiner.page, 'joiner')
  await joiner.page.click('#join')

  for (const side of [owner, joiner]) {
    await side.page.waitForFunction(() => window.demo.openChannels() === 1, null, { timeout: TIMEOUT })
  }
  await joiner.page.fill('#chat', 'hello from the joiner')
  await joiner.page.click('#send')
  await owner.page.waitForFunction(() => window.demo.received.length > 0, null, { timeout: TIMEOUT })
  await owner.page.fill('#chat', 'hello from the owner')
  await owner.page.click('#send')
  await joiner.page.waitForFunction(() => window.demo.received.length > 0, null, { timeout: TIMEOUT })

  result.ownerReceived = await owner.page.evaluate(() => window.demo.received.map((m) => m.text))
  result.joinerReceived = await joiner.page.evaluate(() => window.demo.received.map((m) => m.text))
  result.ownerStatus = await owner.page.textContent('#status')
  result.iceServers = await joiner.page.evaluate(() => window.demo.iceConfig.iceServers)
  // Each page shows its own camera and, once media flows, the other's.
  for (const [key, side] of [['ownerVideos', owner], ['joinerVideos', joiner]]) {
    await side.page.waitForFunction(() => document.querySelectorAll('#videos video').length === 2, null, { timeout: TIMEOUT })
    result[key] = await side.page.evaluate(() => [...document.querySelectorAll('#videos video')].map((v) => ({
      local: v.id === 'video-local', tracks: v.srcObject ? v.srcObject.getTracks().map((t) => t.kind).sort() : []
    })))
  }
  result.ok = true
} catch (error) {
  result.ok = false
  result.error = String(error)
  result.ownerLogs = owner && owner.logs
  result.joinerLogs = joiner && joiner.logs
  for (const side of [owner, joiner]) {
    if (side) {
      result[side === owner ? 'ownerPageLog' : 'joinerPageLog'] = await side.page.textContent('#log').catch(() => null)
    }
  }
} finally {
  await browser.close()
}
console.log(JSON.stringify(result))
