// The published clients with AUTH on: each connects with a token and is refused without one.
//
//   node auth_clients.mjs <http base of polysignal> <token for alice> <token for mallory>
//
// peerjs 1.5 (headless Chromium): `new Peer('alice', {token})` opens; without a token, and with
//   a token whose subject is another (mallory asking for 'alice'), the Peer gets an error.
// @localfirst/relay 4.x (Node): a Client whose url carries the token as a path prefix
//   (`ws://host/token/<jwt>`, to which the client appends `/introduction/<peerId>`) opens its
//   server connection; one without the prefix does not, and the socket is told why.
//
// Prints one JSON object as its last line ("error" set if the script itself failed).
import { Client } from '@localfirst/relay/Client.js'
import { launchBrowser } from './browser.mjs'
import { UNIT, openPage, openPeer, peerOptions } from './peerjs_page.mjs'

const [base, aliceToken, malloryToken] = process.argv.slice(2)
const ws = base.replace(/^http/, 'ws')

// A relay client's server connection: 'open', or 'closed' (refused), within the wait.
function relayOutcome (url, peerId, waitMs = 5000 * UNIT) {
  return new Promise((resolve) => {
    const client = new Client({ peerId, url })
    const done = (outcome) => {
      clearTimeout(timer)
      try { client.disconnectServer() } catch {}
      resolve(outcome)
    }
    const timer = setTimeout(() => done('timeout'), waitMs)
    const socket = client.serverConnection
    socket.addEventListener('open', () => done('open'))
    socket.addEventListener('error', () => done('refused'))
  })
}

const browser = await launchBrowser()
const logs = []
const result = {}
const watchdog = setTimeout(() => {
  console.log(JSON.stringify({ error: 'script watchdog expired', logs }))
  process.exit(2)
}, 50000 * UNIT)
try {
  result.relayWithToken = await relayOutcome(`${ws}/token/${aliceToken}`, 'alice')
  result.relayWithoutToken = await relayOutcome(ws, 'alice')
  result.relayOtherId = await relayOutcome(`${ws}/token/${aliceToken}`, 'bob')
  const page = await openPage(browser, base, 'alice', logs)
  result.peerjsWithToken = await openPeer(page, 'alice', peerOptions(base, { token: aliceToken }))
  await page.page.evaluate(() => window.peer.destroy())
  const other = await openPage(browser, base, 'other', logs)
  result.peerjsWithoutToken = await openPeer(other, 'alice', peerOptions(base))
  await other.page.evaluate(() => window.peer.destroy())
  const mallory = await openPage(browser, base, 'mallory', logs)
  result.peerjsOtherSubject = await openPeer(mallory, 'alice', peerOptions(base, { token: malloryToken }))
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err)
  result.logs = logs
} finally {
  clearTimeout(watchdog)
  await browser.close()
}
console.log(JSON.stringify(result))
process.exit(0)
