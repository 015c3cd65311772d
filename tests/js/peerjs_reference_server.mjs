// The original PeerJS server (`peer` 1.0.2, published npm package) as a reference: the browser
// tests run their compatible cases against it too, which shows the harness is right.
//
//   node peerjs_reference_server.mjs
//
// Listens on a free 127.0.0.1 port with path '/' (WebSocket at /peerjs, ids at /peerjs/id) and
// prints {"port": N} once it listens; runs until its stdin closes or it gets SIGTERM/SIGINT.
import { PeerServer } from 'peer'

const server = PeerServer({ host: '127.0.0.1', port: 0, path: '/' }, (http) => {
  console.log(JSON.stringify({ port: http.address().port }))
  const stop = () => {
    http.closeAllConnections?.()
    http.close(() => process.exit(0))
    setTimeout(() => process.exit(0), 1000).unref()
  }
  process.stdin.on('end', stop)
  process.stdin.on('close', stop)
  process.stdin.resume()
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
})
server.on('error', (err) => console.error('peer error:', err && err.message))
