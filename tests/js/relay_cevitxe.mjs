// Two cevitxe-signal-client 0.4.2 clients (the published package) join one key through
// polysignal: each gets the other's Introduction, opens its /connection socket and emits `peer`,
// and a message crosses both ways. The client expects a browser-like global WebSocket (from `ws`)
// and requires `cuid` without declaring it. Usage: node relay_cevitxe.mjs <url> [<url for bob>].
// Prints one JSON object as its last line.
import { createRequire } from 'node:module'
import WebSocket from 'ws'

globalThis.WebSocket = WebSocket
const require = createRequire(import.meta.url)
const { Client } = require('cevitxe-signal-client')

const [urlA, urlB = urlA] = process.argv.slice(2)
if (!urlA) throw new Error('usage: node relay_cevitxe.mjs <ws url> [<ws url>]')
const key = `key-${process.pid}`
const deadline = setTimeout(() => finish({ ok: false, error: 'timed out' }), 20000)
const clients = []

function finish (result) {
  clearTimeout(deadline)
  console.log(JSON.stringify(result))
  process.exit(0)
}

function run (id, url) {
  return new Promise((resolve) => {
    const client = new Client({ id, url })
    clients.push(client)
    client.on('peer', (peer, peerKey) => {
      const socket = peer.get(peerKey)
      socket.onmessage = ({ data }) => resolve({ remote: peer.id, key: peerKey, got: String(data) })
      socket.send(`hello from ${id}`)
    })
    client.join(key)
  })
}

const opened = (client) => new Promise((resolve) => {
  const wait = () => (client.serverConnection.readyState === WebSocket.OPEN ? resolve() : setTimeout(wait, 20))
  wait()
})

const alice = run('alice', urlA)
await opened(clients[0])
const bob = run('bob', urlB)
const [a, b] = await Promise.all([alice, bob])
finish({ ok: true, key, alice: a, bob: b })
