// Shared by the PeerJS browser scripts: pages that load the published `peerjs` browser bundle
// (node_modules/peerjs/dist/peerjs.min.js) and open a Peer against a PeerJS server.
//
// Each page is a tiny HTML page served (intercepted) on the server's own http origin, so the
// bundle and the page share that origin; the Peer's WebSocket goes wherever its options say
// (the server itself, or a TCP proxy in front of it).
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
import { isolatedContext } from './browser.mjs'

const here = dirname(fileURLToPath(import.meta.url))
export const BUNDLE = join(here, 'node_modules', 'peerjs', 'dist', 'peerjs.min.js')
export const UNIT = Number(process.env.POLYSIGNAL_TEST_UNIT || '1')

const PAGE = '/peerjs-test.html'
const SCRIPT = '/peerjs-test-bundle.js'
const HTML = `<!doctype html><meta charset="utf-8"><title>peerjs test</title>
<script src="${SCRIPT}"></script>
<script>
  // Helpers the scripts drive through page.evaluate.
  window.openPeer = (id, options, waitMs) => new Promise((resolve) => {
    const peer = new window.peerjs.Peer(id, options)
    window.peer = peer
    const timer = setTimeout(() => resolve({ outcome: 'timeout' }), waitMs)
    peer.on('open', (got) => { clearTimeout(timer); resolve({ outcome: 'open', id: got }) })
    peer.on('error', (err) => {
      clearTimeout(timer)
      resolve({ outcome: 'error', type: err.type, message: String(err.message || err) })
    })
  })
  document.title = 'ready'
</script>`

// Peer options for the server at http base `base`, or for `wsPort` on 127.0.0.1 if given.
export function peerOptions (base, extra = {}, wsPort = null) {
  const url = new URL(base)
  return {
    host: url.hostname,
    port: wsPort || Number(url.port),
    path: url.pathname || '/',
    key: 'peerjs',
    secure: false,
    debug: 0,
    config: { iceServers: [] },
    ...extra
  }
}

// A page of its own isolated context on `base`'s origin, with the peerjs bundle loaded.
// `init` (optional) is a function run in the page before any of its scripts.
export async function openPage (browser, base, name, logs, init = null) {
  const origin = new URL(base).origin
  const context = await isolatedContext(browser, origin)
  if (init) await context.addInitScript(init)
  await context.route(origin + PAGE, route =>
    route.fulfill({ contentType: 'text/html', body: HTML }))
  await context.route(origin + SCRIPT, route =>
    route.fulfill({ contentType: 'text/javascript', path: BUNDLE }))
  const page = await context.newPage()
  page.on('console', msg => logs.push(`${name} ${msg.type()}: ${msg.text()}`))
  page.on('pageerror', err => logs.push(`${name} pageerror: ${err.message}`))
  await page.goto(origin + PAGE)
  await page.waitForFunction(() => document.title === 'ready' && !!window.peerjs,
    null, { timeout: 10000 * UNIT })
  return { context, page, name }
}

// Open `id` (or a server-assigned id when null) on the page: {outcome: 'open'|'error'|'timeout', ...}.
export async function openPeer (handle, id, options, waitMs = 5000 * UNIT) {
  return handle.page.evaluate(({ id, options, waitMs }) => window.openPeer(id, options, waitMs),
    { id, options, waitMs })
}

export function randomId (prefix) {
  return prefix + '-' + Math.random().toString(36).slice(2, 10)
}
