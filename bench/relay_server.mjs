// The reference for the relay protocol: @localfirst/relay 4.2.2's `Server`, as published (its
// dist/start.js does the same), on 127.0.0.1 only. Nothing of its code is changed.
//   PORT=8080 node relay_server.mjs
import { Server } from '@localfirst/relay/Server.js'

const port = Number(process.env.PORT) || 8080
const server = new Server({ port })
// express-ws's app.listen passes its arguments to http.Server#listen: add the host.
const listen = server.app.listen
server.app.listen = function (p, callback) { return listen.call(this, p, '127.0.0.1', callback) }
server.on('error', () => {}) // malformed frames are reported as events; nothing to do
await server.listen({ silent: true })
console.log(`@localfirst/relay listening on 127.0.0.1:${port}`)
