// The published `peerjs` 1.5 client in isolated headless Chromium contexts, against a PeerJS
// server (polysignal, or the original `peer` 1.0.2 as a reference).
//
//   node peerjs_browser.mjs connect <http base of A's server> [<http base of B's server>]
//   node peerjs_browser.mjs ghost <http base of the server> [<ping ms> [<retry bound ms>]]
//
// connect: A opens a data connection to B by id and a message crosses both ways; A calls B with
//   a fake-device MediaStream, B answers with its own, both get the remote stream; a third page
//   claiming A's live id (on B's server) gets the 'unavailable-id' error.
// ghost: a page's WebSocket goes through a TCP proxy in this script, which is cut abruptly: the
//   browser side is reset, the server side is left open and silent (a dead network path, no
//   close ever reaches the server). Then a new page claims the ghost's id with a new token,
//   claiming again while the answer is 'unavailable-id' until <retry bound ms> after the cut;
//   and another ghost is claimed once by a "reload" that presents the same token. Each claim's
//   outcome ('open', 'error' with its type, or 'timeout'), the answers it got and its time since
//   the cut are reported, and an id claimed back is shown reachable by a data connection from a
//   third page. Every page sends its heartbeat every <ping ms>.
//
// Prints one JSON object as its last line ("error" set if the script itself failed).
import net from 'node:net'
import { launchBrowser } from './browser.mjs'
import { UNIT, openPage, openPeer, peerOptions, randomId } from './peerjs_page.mjs'

const [scenario, baseA, ...rest] = process.argv.slice(2)
const baseB = (scenario === 'connect' && rest[0]) || baseA
// ghost: the pages' heartbeat period (peerjs's pingInterval, 5000 by default), and how long
// after the cut a new token keeps claiming the ghost's id while it is taken.
const [pingMs, retryBoundMs] = scenario === 'ghost' ? [Number(rest[0] || 5000), Number(rest[1] || 0)] : []
// How long one claim may take before it counts as unanswered ('timeout').
const CLAIM_MS = 2000 * UNIT
// Pause between two claims of an id that is taken.
const RETRY_MS = 100
const ghostOptions = (extra = {}, wsPort = null) =>
  peerOptions(baseA, { pingInterval: pingMs, ...extra }, wsPort)

// A TCP proxy on 127.0.0.1 to `port` whose connections can be cut.
async function startProxy (port) {
  const live = new Set()
  const ghosts = new Set()
  const server = net.createServer((client) => {
    const upstream = net.connect(port, '127.0.0.1')
    const pair = { client, upstream }
    live.add(pair)
    client.pipe(upstream)
    upstream.pipe(client)
    const drop = () => {
      client.destroy()
      upstream.destroy()
      live.delete(pair)
      ghosts.delete(pair)
    }
    client.on('error', () => { if (live.has(pair)) drop() })
    client.on('close', () => { if (live.has(pair)) drop() })
    upstream.on('error', drop)
    upstream.on('close', drop)
  })
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  return {
    port: server.address().port,
    live: () => live.size,
    // The browser's side is reset; the server's side stays open and hears nothing more.
    cut () {
      for (const pair of live) {
        live.delete(pair)
        ghosts.add(pair)
        pair.client.unpipe(pair.upstream)
        pair.upstream.unpipe(pair.client)
        pair.upstream.pause()
        pair.client.resetAndDestroy()
      }
    },
    async close () {
      for (const pair of [...live, ...ghosts]) { pair.client.destroy(); pair.upstream.destroy() }
      await new Promise(resolve => server.close(resolve))
    }
  }
}

// On `handle`'s page: accept every data connection (echo each message, keep the first) and answer
// every call with a fake-device stream.
async function listen (handle) {
  await handle.page.evaluate(() => {
    window.received = new Promise((resolve) => {
      window.peer.on('connection', (conn) => {
        window.incomingMetadata = conn.metadata
        window.incomingPeer = conn.peer
        conn.on('data', (data) => { conn.send('echo: ' + data); resolve(data) })
      })
    })
    window.answered = new Promise((resolve, reject) => {
      window.peer.on('call', async (call) => {
        try {
          const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: true })
          call.on('stream', (remote) => resolve({
            from: call.peer,
            metadata: call.metadata,
            kinds: remote.getTracks().map(t => t.kind).sort()
          }))
          call.answer(stream)
        } catch (err) { reject(err) }
      })
    })
  })
}

// From `handle`'s page: a data connection to `target`; the reply to `text`.
async function sendAndReply (handle, target, text) {
  return handle.page.evaluate(({ target, text, ms }) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no reply from ${target} within ${ms} ms`)), ms)
    const conn = window.peer.connect(target, { metadata: { hello: 'from ' + window.peer.id }, reliable: true })
    conn.on('open', () => conn.send(text))
    conn.on('data', (data) => { clearTimeout(timer); resolve(data) })
    conn.on('error', (err) => { clearTimeout(timer); reject(err) })
    window.peer.on('error', (err) => { clearTimeout(timer); reject(new Error(err.type + ': ' + err.message)) })
  }), { target, text, ms: 15000 * UNIT })
}

async function connectScenario (browser, logs) {
  const result = {}
  const a = await openPage(browser, baseA, 'A', logs)
  const b = await openPage(browser, baseB, 'B', logs)
  const c = await openPage(browser, baseB, 'C', logs)
  const [idA, idB] = [randomId('peer-a'), randomId('peer-b')]
  result.openB = await openPeer(b, idB, peerOptions(baseB))
  result.openA = await openPeer(a, idA, peerOptions(baseA))
  await listen(b)

  // Data both ways.
  result.reply = await sendAndReply(a, idB, 'hello from A')
  result.receivedByB = await b.page.evaluate(() => window.received)
  result.incomingPeer = await b.page.evaluate(() => window.incomingPeer)
  result.incomingMetadata = await b.page.evaluate(() => window.incomingMetadata)

  // A media call with fake-device streams; B answers with its own.
  result.callerGot = await a.page.evaluate(({ target, ms }) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no remote stream within ${ms} ms`)), ms)
    navigator.mediaDevices.getUserMedia({ audio: true, video: true }).then((stream) => {
      const call = window.peer.call(target, stream, { metadata: { call: 1 } })
      call.on('stream', (remote) => {
        clearTimeout(timer)
        resolve({ kinds: remote.getTracks().map(t => t.kind).sort() })
      })
      call.on('error', (err) => { clearTimeout(timer); reject(err) })
    }, reject)
  }), { target: idB, ms: 15000 * UNIT })
  result.calleeGot = await b.page.evaluate(() => window.answered)

  // A third page claims A's live id (through B's server).
  result.claimA = await openPeer(c, idA, peerOptions(baseB))
  result.idA = idA
  result.idB = idB
  // A still holds its id: a message still reaches it.
  result.aStillOpen = await a.page.evaluate(() => window.peer.open && !window.peer.disconnected)
  return result
}

// A page whose WebSocket runs through `proxy` opens `id` with `token`; then the proxy is cut and
// the page sees its socket drop. Returns what the page saw and when the cut happened.
async function makeGhost (browser, proxy, id, token, name, logs) {
  const handle = await openPage(browser, baseA, name, logs)
  const opened = await openPeer(handle, id, ghostOptions({ token }, proxy.port))
  if (opened.outcome !== 'open') return { opened }
  await handle.page.evaluate((ms) => {
    window.dropped = new Promise((resolve) => {
      const timer = setTimeout(() => resolve('no disconnected event'), ms)
      window.peer.on('disconnected', () => { clearTimeout(timer); resolve('disconnected') })
    })
  }, 5000 * UNIT)
  const connections = proxy.live()
  proxy.cut()
  const cutAt = Date.now()
  const seen = await handle.page.evaluate(() => window.dropped)
  // The tab is gone; its server connection stays a ghost.
  await handle.context.close()
  return { opened, connections, seen, cutAt }
}

// Claim `id` on `handle`'s page, again after each 'unavailable-id' (a fresh Peer every time,
// RETRY_MS apart) until it opens, another answer comes, or `boundMs` has passed since `since`.
// Reports the last answer, every answer, the time since `since` and since the first claim.
async function claim (handle, id, options, since, boundMs) {
  const answers = []
  const first = Date.now()
  for (;;) {
    const got = await openPeer(handle, id, options, CLAIM_MS)
    answers.push(got.type || got.outcome)
    const [ms, claimingMs] = [Date.now() - since, Date.now() - first]
    if (got.type !== 'unavailable-id' || ms > boundMs) return { ...got, ms, claimingMs, answers }
    await handle.page.evaluate((wait) => {
      window.peer.destroy()
      return new Promise(resolve => setTimeout(resolve, wait))
    }, RETRY_MS)
  }
}

async function ghostScenario (browser, logs) {
  const result = {}
  const proxy = await startProxy(Number(new URL(baseA).port))
  try {
    const checker = await openPage(browser, baseA, 'checker', logs)
    result.checkerOpen = await openPeer(checker, randomId('checker'), ghostOptions())

    // A new token claims a ghost's id, retrying while it is taken.
    const idNew = randomId('ghost-new')
    const ghost1 = await makeGhost(browser, proxy, idNew, 'tokenone', 'ghost1', logs)
    result.ghostNew = ghost1
    const fresh = await openPage(browser, baseA, 'fresh', logs)
    result.newToken = await claim(fresh, idNew, ghostOptions({ token: 'tokentwo' }),
      ghost1.cutAt, retryBoundMs)
    if (result.newToken.outcome === 'open') {
      await listen(fresh)
      result.newTokenReply = await sendAndReply(checker, idNew, 'to the new owner')
    }

    // A reload presents the ghost's own token: one attempt.
    const idSame = randomId('ghost-same')
    const ghost2 = await makeGhost(browser, proxy, idSame, 'tokenthree', 'ghost2', logs)
    result.ghostSame = ghost2
    const reload = await openPage(browser, baseA, 'reload', logs)
    result.sameToken = await claim(reload, idSame, ghostOptions({ token: 'tokenthree' }),
      Date.now(), 0)
    if (result.sameToken.outcome === 'open') {
      await listen(reload)
      result.sameTokenReply = await sendAndReply(checker, idSame, 'to the reloaded page')
    }
  } finally {
    await proxy.close()
  }
  return result
}

const browser = await launchBrowser()
const logs = []
let result = {}
const watchdog = setTimeout(() => {
  console.log(JSON.stringify({ error: 'script watchdog expired', logs }))
  process.exit(2)
}, 50000 * UNIT)
try {
  if (scenario === 'connect') result = await connectScenario(browser, logs)
  else if (scenario === 'ghost') result = await ghostScenario(browser, logs)
  else throw new Error(`unknown scenario ${scenario}`)
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err)
  result.logs = logs
} finally {
  clearTimeout(watchdog)
  await browser.close()
}
console.log(JSON.stringify(result))
