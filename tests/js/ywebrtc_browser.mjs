// y-webrtc 10.3 (published npm package) in two isolated headless Chromium contexts, signalling
// through polysignal: a Yjs update made in one page reaches the other over the WebRTC data
// channel that y-webrtc negotiated through the server.
// usage: node ywebrtc_browser.mjs <http origin of polysignal> [<query of the signaling url>]
// (the query carries a token when the server requires one: `?token=<jwt>`)
// prints {"synced": true, "value": ..., "webrtcPeers": [n, n]} as its last line
import { build } from 'esbuild'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
import { launchBrowser, isolatedContext } from './browser.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const origin = process.argv[2]
const signaling = origin.replace(/^http/, 'ws') + '/' + (process.argv[3] || '')
const room = 'polysignal-ywebrtc-' + Math.random().toString(36).slice(2)

const bundle = (await build({
  stdin: {
    contents: "import * as Y from 'yjs'\nimport { WebrtcProvider } from 'y-webrtc'\nwindow.Y = Y\nwindow.WebrtcProvider = WebrtcProvider\n",
    resolveDir: here
  },
  bundle: true,
  write: false,
  format: 'iife',
  platform: 'browser',
  inject: [join(here, 'ywebrtc_shims.js')],
  define: { global: 'globalThis' },
  logLevel: 'error'
})).outputFiles[0].text

const html = `<!doctype html><html><body><script>${bundle}</script></body></html>`

const browser = await launchBrowser()
const timer = setTimeout(() => { console.log(JSON.stringify({ error: 'timeout' })); process.exit(2) }, 45000)
try {
  const pages = []
  for (let i = 0; i < 2; i++) {
    const context = await isolatedContext(browser, origin)
    // The page is served at polysignal's own origin (intercepted), so it may talk to it freely.
    await context.route(origin + '/ywebrtc-test.html', route =>
      route.fulfill({ status: 200, contentType: 'text/html', body: html }))
    const page = await context.newPage()
    page.on('pageerror', e => console.error('pageerror', i, e.message))
    await page.goto(origin + '/ywebrtc-test.html')
    await page.evaluate(([room, signaling]) => {
      window.doc = new window.Y.Doc()
      window.provider = new window.WebrtcProvider(room, window.doc, {
        signaling: [signaling],
        peerOpts: { config: { iceServers: [] } }
      })
    }, [room, signaling])
    pages.push(page)
  }
  // Wait until each side has a connected WebRTC peer.
  for (const page of pages) {
    await page.waitForFunction(() => {
      const conns = window.provider.room && window.provider.room.webrtcConns
      return conns && [...conns.values()].some(c => c.connected)
    }, null, { timeout: 30000 })
  }
  await pages[0].evaluate(() => window.doc.getMap('m').set('greeting', 'hello over webrtc'))
  await pages[1].waitForFunction(() => window.doc.getMap('m').get('greeting') === 'hello over webrtc',
    null, { timeout: 15000 })
  const value = await pages[1].evaluate(() => window.doc.getMap('m').get('greeting'))
  const webrtcPeers = await Promise.all(pages.map(p => p.evaluate(
    () => [...window.provider.room.webrtcConns.values()].filter(c => c.connected).length)))
  const bcPeers = await Promise.all(pages.map(p => p.evaluate(() => window.provider.room.bcConns.size)))
  console.log(JSON.stringify({ synced: true, value, webrtcPeers, bcPeers }))
} finally {
  clearTimeout(timer)
  await browser.close()
}
