// Node globals that simple-peer's dependencies expect, for the browser bundle of the y-webrtc test.
import process from 'process/browser.js'
import { Buffer } from 'buffer'
export { process, Buffer }
