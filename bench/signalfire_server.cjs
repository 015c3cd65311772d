// The reference for Signal-Fire: @signal-fire/server 0.5.0 (createApp with @lucets/registry's
// LocalRegistry, as its README and dist/example.js show), on 127.0.0.1.
//   PORT=3003 node signalfire_server.cjs
//
// One fix at run time, so it answers at all (docs/protocols/signal-fire.md): @lucets/commands
// 1.0.1's Commands#compose() returns a plain `async function` that reads `this.key` and
// `this.#messageHooks`, but the message-hook chain calls it without a `this`, so every command
// throws a TypeError that catchErrors() answers "Internal Server Error". The fix binds the
// returned function to its Commands instance; nothing else is changed, and no code is copied.
const Commands = require('@lucets/commands').default
const compose = Commands.prototype.compose
Commands.prototype.compose = function () { return compose.call(this).bind(this) }

const http = require('node:http')
const createApp = require('@signal-fire/server').default
const { LocalRegistry } = require('@lucets/registry')

const port = Number(process.env.PORT) || 3003
const app = createApp(new LocalRegistry())
// The published app handles upgrades only; a plain GET answers 200 for the bench's readiness
// check (bench.py waits for it).
const server = http.createServer((req, res) => { res.writeHead(200); res.end('ok') })
server.on('upgrade', app.onUpgrade())
server.listen(port, '127.0.0.1', () => {
  console.log(`@signal-fire/server listening on 127.0.0.1:${port}`)
})
