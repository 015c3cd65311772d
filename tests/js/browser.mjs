// Shared launcher for the browser tests: Debian's chromium driven by playwright-core.
// Flags keep it offline and quiet, and let WebRTC use loopback host candidates
// (docs/architecture.md, "Tests").
import { chromium } from 'playwright-core'

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium'

export async function launchBrowser () {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--allow-loopback-in-peer-connection',
      // Pages the tests intercept have no address space of their own; let them reach loopback.
      '--disable-features=WebRtcHideLocalIpsWithMdns,LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests',
      '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
      '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost'
    ]
  })
}

// A fresh, isolated context (no shared BroadcastChannel or storage) whose pages may gather
// 127.0.0.1 candidates: Chromium offers host candidates only to pages holding camera/microphone.
export async function isolatedContext (browser, origin) {
  const context = await browser.newContext()
  await context.grantPermissions(['camera', 'microphone'], { origin })
  return context
}
