// The two @localfirst/relay server test cases that keep a socket open after malformed input, run
// against polysignal with the steps and assertions of their originals:
//
// * "should not crash when sent malformed data" (4.x, src/test/Server.test.ts of the published
//   package): Alice joins; Bob opens his /introduction socket, sends the bytes [1, 2, 3] (not
//   msgpack), then a msgpack Join for the same document, and must get an Introduction back. It
//   uses the package's own helpers (pack/unpack, eventPromise, isReady from its dist/lib).
// * "should not crash when sent malformed JSON" (3.6, packages/server/src/Server.test.ts): the
//   same over JSON text, with the bad message '{╯°□°}╯︵ ┻━┻'.
//
// Usage: node relay_malformed.mjs <ws url>. Prints one JSON object as its last line:
// {ok, cases: {<name>: {ok, message, aliceId, documentId} or {ok, error}}}.
import WebSocket from 'isomorphic-ws'
import { pack, unpack } from './node_modules/@localfirst/relay/dist/lib/msgpack.js'
import { eventPromise } from './node_modules/@localfirst/relay/dist/lib/eventPromise.js'
import { isReady } from './node_modules/@localfirst/relay/dist/lib/isReady.js'

const [url] = process.argv.slice(2)
if (!url) throw new Error('usage: node relay_malformed.mjs <ws url>')
const deadline = setTimeout(() => finish({ ok: false, error: 'timed out' }), 20000)
const sockets = []
let testId = 0

function finish (result) {
  clearTimeout(deadline)
  for (const socket of sockets) {
    try { socket.close() } catch {}
  }
  console.log(JSON.stringify(result))
  process.exit(0)
}

function open (path) {
  const socket = new WebSocket(`${url}${path}`)
  sockets.push(socket)
  return socket
}

function setup () {
  testId++
  const id = `${process.pid}-${testId}`
  return { aliceId: `alice-${id}`, bobId: `bob-${id}`, documentId: `test-documentId-${id}` }
}

// A close instead of the Introduction fails the case at once (the originals' tests would time out).
function closed (socket) {
  return new Promise((resolve, reject) => {
    socket.on('close', (code, reason) => reject(new Error(`closed ${code} "${reason}"`)))
  })
}

// 4.x: requestIntroduction(url, peerId, documentId) of the original test file.
async function requestIntroduction (peerId, documentId, encode) {
  const peer = open(`/introduction/${peerId}`)
  await isReady(peer)
  peer.send(encode({ type: 'Join', documentIds: [documentId] }))
  return peer
}

async function malformedData () {
  const { aliceId, bobId, documentId } = setup()
  await requestIntroduction(aliceId, documentId, pack)
  // Bob's behavior will be non-standard so we'll drive it by hand
  const bob = open(`/introduction/${bobId}`)
  const badMessage = new Uint8Array([1, 2, 3]) // not valid msgpack
  await eventPromise(bob, 'open')
  bob.send(badMessage)
  bob.send(pack({ type: 'Join', documentIds: [documentId] }))
  // The bad message didn't kill the server - Bob gets a response back
  const messageBytes = await Promise.race([eventPromise(bob, 'message'), closed(bob)])
  const msg = unpack(messageBytes)
  if (msg.type !== 'Introduction') throw new Error(`expected an Introduction, got ${JSON.stringify(msg)}`)
  return { message: msg, aliceId, documentId }
}

async function malformedJson () {
  const { aliceId, bobId, documentId } = setup()
  await requestIntroduction(aliceId, documentId, (message) => JSON.stringify(message))
  const bob = open(`/introduction/${bobId}`)
  const badMessage = '{╯°□°}╯︵ ┻━┻' // 🡐 not valid JSON
  await eventPromise(bob, 'open')
  bob.send(badMessage)
  bob.send(JSON.stringify({ type: 'Join', documentIds: [documentId] }))
  const data = await Promise.race([eventPromise(bob, 'message'), closed(bob)])
  const msg = JSON.parse(data.toString())
  if (msg.type !== 'Introduction') throw new Error(`expected an Introduction, got ${JSON.stringify(msg)}`)
  return { message: msg, aliceId, documentId }
}

const cases = {}
let ok = true
for (const [name, run] of [
  ['should not crash when sent malformed data', malformedData],
  ['should not crash when sent malformed JSON', malformedJson]
]) {
  try {
    cases[name] = { ok: true, ...(await run()) }
  } catch (error) {
    ok = false
    cases[name] = { ok: false, error: String(error) }
  }
}
finish({ ok, cases })
