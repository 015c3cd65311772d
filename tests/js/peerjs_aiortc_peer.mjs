// The browser side of the aiortc interop test: the published `peerjs` 1.5 client in headless
// Chromium waits for a data connection from a Python peer that speaks the PeerJS protocol itself.
//
//   node peerjs_aiortc_peer.mjs <http base of the server> <id to open>
//
// Every frame the page's WebSocket sends or receives is recorded (parsed JSON), so the test can
// compare what each side sent with what the other received. Prints {"ready": true, ...} once the
// peer is open; then, on each incoming connection, sends "hello from browser" when it opens (again
// every 500 ms until a message arrives) and answers every message with "echo: <message>". When a line "done" arrives on stdin (or after a
// bounded wait), prints the recorded frames, the connection's options and the messages it got as
// one JSON object, its last line.
import { createInterface } from 'node:readline'
import { launchBrowser } from './browser.mjs'
import { UNIT, openPage, openPeer, peerOptions } from './peerjs_page.mjs'

const [base, id] = process.argv.slice(2)

// Runs in the page before its scripts: record every WebSocket frame both ways.
function recordFrames () {
  window.framesIn = []
  window.framesOut = []
  const parse = (text) => { try { return JSON.parse(text) } catch { return { unparsed: String(text) } } }
  const NativeWebSocket = window.WebSocket
  window.WebSocket = class extends NativeWebSocket {
    constructor (...args) {
      super(...args)
      this.addEventListener('message', (ev) => window.framesIn.push(parse(ev.data)))
    }

    send (data) {
      window.framesOut.push(parse(data))
      return super.send(data)
    }
  }
}

const done = new Promise((resolve) => {
  const lines = createInterface({ input: process.stdin })
  lines.on('line', (line) => { if (line.trim() === 'done') resolve('done') })
  lines.on('close', () => resolve('stdin closed'))
  setTimeout(() => resolve('timeout'), 30000 * UNIT).unref()
})

const browser = await launchBrowser()
const logs = []
const result = {}
try {
  const handle = await openPage(browser, base, 'browser', logs, recordFrames)
  const opened = await openPeer(handle, id, peerOptions(base))
  await handle.page.evaluate(() => {
    window.connections = []
    window.received = []
    window.events = []
    window.peer.on('error', (err) => window.events.push(`peer error ${err.type}: ${err.message}`))
    window.peer.on('connection', (conn) => {
      window.events.push('connection')
      conn.on('iceStateChanged', (state) => window.events.push('ice ' + state))
      conn.on('error', (err) => window.events.push(`error ${err.type}: ${err.message}`))
      conn.on('close', () => window.events.push('close'))
      window.connections.push({
        peer: conn.peer,
        connectionId: conn.connectionId,
        label: conn.label,
        serialization: conn.serialization,
        reliable: conn.reliable,
        metadata: conn.metadata
      })
      // The greeting is repeated until the Python peer answers: under load, one sent the moment
      // the channel opened was once never received by the Python peer (behind peer 1.0.2 as
      // behind polysignal), and the signaling server is not what this test is about there.
      let greeting = null
      conn.on('open', () => {
        window.events.push('open')
        conn.send('hello from browser')
        greeting = setInterval(() => conn.send('hello from browser'), 500)
      })
      conn.on('data', (data) => {
        clearInterval(greeting)
        window.received.push(data)
        conn.send('echo: ' + data)
      })
    })
  })
  // Only now may the Python peer offer: the page listens for its connection.
  console.log(JSON.stringify({ ready: opened.outcome === 'open', opened }))
  result.ending = await done
  Object.assign(result, await handle.page.evaluate(() => ({
    connections: window.connections,
    received: window.received,
    events: window.events,
    framesIn: window.framesIn,
    framesOut: window.framesOut
  })))
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err)
} finally {
  result.logs = logs
  await browser.close()
}
console.log(JSON.stringify(result))
process.exit(0)
