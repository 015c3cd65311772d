// Two @localfirst/relay 4.2.2 clients (the published package) join one documentId through
// polysignal, each gets `peer-connect`, and a text and a binary message cross the piped socket
// both ways. Usage: node relay_v4.mjs <ws url for alice> [<ws url for bob>] (two urls: two nodes).
// Prints one JSON object as its last line.
import { Client } from '@localfirst/relay/Client.js'

const [urlA, urlB = urlA] = process.argv.slice(2)
if (!urlA) throw new Error('usage: node relay_v4.mjs <ws url> [<ws url>]')
const documentId = `doc-${process.pid}`
const deadline = setTimeout(() => finish({ ok: false, error: 'timed out' }), 20000)
const clients = []

function finish (result) {
  clearTimeout(deadline)
  for (const client of clients) {
    try { client.disconnectServer() } catch {}
  }
  console.log(JSON.stringify(result))
  process.exit(0)
}

function decode (data) {
  // Text frames arrive as strings; binary frames as ArrayBuffers (binaryType 'arraybuffer').
  if (typeof data === 'string') return { kind: 'text', value: data }
  return { kind: 'binary', value: Buffer.from(data).toString('hex') }
}

// The client emits `peer-connect` only after an `await`, so frames the server flushes from a held
// socket as the pair connects (docs/protocols/relay.md, "Pipes") can reach the socket before the
// application's listener exists; the original servers flush the same way. So each side first
// says "ready", and sends its payload once it hears the other's "ready" (answering the first one
// with "again", in case its own "ready" went out before the other side listened).
function run (peerId, url) {
  return new Promise((resolve, reject) => {
    const client = new Client({ peerId, url })
    clients.push(client)
    const got = []
    let sent = false
    client.on('error', (error) => reject(new Error(`${peerId}: ${error}`)))
    client.on('peer-connect', ({ peerId: remote, documentId: doc, socket }) => {
      socket.addEventListener('message', (event) => {
        const message = decode(event.data)
        if (message.kind === 'text' && (message.value === 'ready' || message.value === 'again')) {
          if (message.value === 'ready') socket.send('again')
          if (!sent) {
            sent = true
            socket.send(`hello from ${peerId}`)
            socket.send(Uint8Array.from([0, 1, 2, 255]))
          }
          return
        }
        got.push(message)
        if (got.length === 2) resolve({ remote, doc, got })
      })
      socket.send('ready')
    })
    client.join(documentId)
  })
}

try {
  const alice = run('alice', urlA)
  // Bob starts once Alice is connected to her server, so he is the one whose Join introduces.
  await new Promise((resolve) => {
    const wait = () => (clients[0].open ? resolve() : setTimeout(wait, 20))
    wait()
  })
  const bob = run('bob', urlB)
  const [a, b] = await Promise.all([alice, bob])
  finish({ ok: true, documentId, alice: a, bob: b })
} catch (error) {
  finish({ ok: false, error: String(error) })
}
