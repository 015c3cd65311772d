// The load generator: drives the topics protocol (y-webrtc / Flow-Like) over raw TCP sockets.
//
//   node loadgen.mjs '<json config>'
//
// Runs one scenario and prints its result as one JSON object on the last line of stdout. Every
// loop is bounded in count and in time; every target is a 127.0.0.1 URL (checked). It reports
// its own CPU time next to every figure, and the servers' (read from /proc for the given pids),
// so a run shows whether the generator or the server was the bottleneck.
//
// Scenarios (config.scenario):
//   fanout  rooms x peers, each publish carries a fake SDP of payloadBytes; either a ramp of
//           publish rates until delivered messages/s stops growing followed by a latency step at
//           a fraction of the maximum (S1), or one fixed rate (S2)
//   idle    count connections, each subscribed to its own topic; prints READY when all are
//           connected, and closes them when a line arrives on stdin (S3)
//   churn   connect + subscribe + ping/pong + close cycles at a fixed concurrency (S4)

import { readFileSync } from 'node:fs'
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import { createInterface } from 'node:readline'

const config = JSON.parse(process.argv[2] || '{}')
const urls = config.urls || []
for (const url of urls) {
  if (!/^ws:\/\/127\.0\.0\.1:\d+\/?$/.test(url)) throw new Error(`not a loopback URL: ${url}`)
}
if (urls.length === 0) throw new Error('config.urls is empty')
const serverPids = config.serverPids || []
const deadline = performance.now() + (config.maxSeconds || 300) * 1000

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const now = () => performance.now()

// --- CPU accounting ---
const TICKS = 100 // USER_HZ on Linux
const serverCpuSeconds = () => {
  let total = 0
  for (const pid of serverPids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      total += (Number(fields[11]) + Number(fields[12])) / TICKS
    } catch {
      // the server is gone: its CPU stays as last read
    }
  }
  return total
}
const cpuMark = () => ({ wall: now(), own: process.cpuUsage(), server: serverCpuSeconds() })
const cpuSince = mark => {
  const wall = (now() - mark.wall) / 1000
  const own = process.cpuUsage(mark.own)
  return {
    generatorCpu: round((own.user + own.system) / 1e6 / wall, 3),
    serverCpu: round((serverCpuSeconds() - mark.server) / wall, 3)
  }
}

const round = (x, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits
const percentile = (values, p) => {
  if (values.length === 0) return null
  const sorted = Float64Array.from(values).sort()
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

// --- a raw WebSocket client ---
// The generator parses and frames WebSocket itself on plain TCP sockets: server frames are read
// in place out of each TCP chunk (one call per chunk, not one event per message), and client
// frames use a zero mask key (legal, RFC 6455 §5.3), so a payload is copied, not XORed. This
// keeps the generator's CPU well below the server's.
const HANDSHAKE = port => Buffer.from('GET / HTTP/1.1\r\nHost: 127.0.0.1:' + port + '\r\n' +
  'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n' +
  'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n', 'latin1')
const HEAD_END = Buffer.from('\r\n\r\n')

// A masked client frame of an ASCII string, with a zero mask key.
const clientText = (text, opcode = 0x1) => {
  const length = text.length
  let frame
  let at
  if (length < 126) {
    frame = Buffer.allocUnsafe(6 + length)
    frame[1] = 0x80 | length
    at = 2
  } else if (length < 65536) {
    frame = Buffer.allocUnsafe(8 + length)
    frame[1] = 0x80 | 126
    frame.writeUInt16BE(length, 2)
    at = 4
  } else {
    throw new Error('frame too long for the generator')
  }
  frame[0] = 0x80 | opcode
  frame.writeUInt32BE(0, at)
  frame.latin1Write(text, at + 4)
  return frame
}
const CLOSE_1000 = Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
const PING_FRAME = clientText('{"type":"ping"}')

// isPublish / isPong look at the 10th and 11th bytes of '{"type":"publish"' / '{"type":"pong"'.
const isPublish = (buf, start) => buf[start + 9] === 0x70 && buf[start + 10] === 0x75
const isPong = (buf, start) => buf[start + 9] === 0x70 && buf[start + 10] === 0x6f

const READ_BUFFER = Buffer.allocUnsafe(256 * 1024)

class RawPeer {
  constructor (url, onText) {
    const port = Number(new URL(url).port)
    this.onText = onText
    this.rest = null
    this.head = null
    this.onPong = null
    this.closed = false
    let onChunk = null
    // Reads land in one shared buffer and are handled at once (no stream, no 'data' event);
    // what must outlive the callback (a partial frame) is copied.
    this.socket = net.connect({
      port,
      host: '127.0.0.1',
      onread: { buffer: READ_BUFFER, callback: (bytes, buf) => { onChunk(buf.subarray(0, bytes)) } }
    })
    this.socket.setNoDelay(true)
    this.opened = new Promise((resolve, reject) => {
      this.socket.once('error', reject)
      this.socket.once('close', () => reject(new Error('closed during the handshake')))
      this.socket.on('connect', () => this.socket.write(HANDSHAKE(port)))
      onChunk = chunk => {
        if (this.head !== true) {
          this.head = this.head ? Buffer.concat([this.head, chunk]) : Buffer.from(chunk)
          const end = this.head.indexOf(HEAD_END)
          if (end < 0) return
          if (this.head.toString('latin1', 0, 12) !== 'HTTP/1.1 101') {
            reject(new Error(this.head.toString('latin1', 0, 40)))
            this.socket.destroy()
            return
          }
          chunk = this.head.subarray(end + 4)
          this.head = true
          resolve(this)
          if (chunk.length === 0) return
        }
        this.onData(chunk)
      }
    })
    this.socket.on('error', () => {})
    this.socket.on('close', () => { this.closed = true })
  }

  onData (chunk) {
    const at = now() // one clock read per TCP chunk, shared by the frames in it
    const buf = this.rest ? Buffer.concat([this.rest, chunk]) : chunk
    const n = buf.length
    let off = 0
    while (n - off >= 2) {
      const first = buf[off]
      let length = buf[off + 1] & 0x7f
      let start = off + 2
      if (length === 126) {
        if (n - off < 4) break
        length = buf.readUInt16BE(off + 2)
        start = off + 4
      } else if (length === 127) {
        if (n - off < 10) break
        length = Number(buf.readBigUInt64BE(off + 2))
        start = off + 10
      }
      const end = start + length
      if (end > n) break
      const opcode = first & 0x0f
      if (opcode === 0x1) {
        if (this.onPong !== null && isPong(buf, start)) this.onPong()
        else this.onText(buf, start, end, at)
      } else if (opcode === 0x9) {
        this.socket.write(clientText(buf.toString('latin1', start, end), 0xa))
      }
      off = end
    }
    this.rest = off < n ? Buffer.from(buf.subarray(off)) : null
  }

  send (text) { this.socket.write(clientText(text)) }
  get buffered () { return this.socket.writableLength }

  // Send a ping and wait for its pong: the server has handled everything sent before it.
  pingPong () {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.onPong = null; reject(new Error('no pong')) }, 10000)
      this.onPong = () => { clearTimeout(timer); this.onPong = null; resolve() }
      this.socket.write(PING_FRAME)
    })
  }

  // The closing handshake; the server then closes TCP (RFC 6455 §7.1.1).
  close () {
    if (this.closed) return Promise.resolve()
    return new Promise(resolve => {
      this.socket.once('close', resolve)
      this.socket.write(CLOSE_1000)
    })
  }
}

// Open `count` peers, at most `parallel` handshakes at a time; each runs `onOpen(peer, i)`.
const connectAll = async (count, parallel, makeUrl, onText, onOpen, timeoutMs) => {
  const peers = new Array(count)
  let next = 0
  let failed = 0
  let firstError = null
  const until = Math.min(deadline, now() + timeoutMs)
  const worker = async () => {
    while (next < count && now() < until) {
      const i = next++
      const peer = new RawPeer(makeUrl(i), onText)
      peers[i] = peer
      let timer
      const ok = await Promise.race([
        peer.opened.then(() => onOpen(peer, i)).then(() => true, error => {
          firstError = firstError || String(error && error.message)
          return false
        }),
        new Promise(resolve => { timer = setTimeout(() => resolve(false), 10000) })
      ])
      clearTimeout(timer)
      if (!ok) {
        failed++
        peer.socket.destroy()
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(parallel, count) }, worker))
  return { peers: peers.filter(Boolean), failed, firstError }
}

const closeAll = async peers => {
  await Promise.race([Promise.all(peers.map(peer => peer.close())), sleep(5000)])
  for (const peer of peers) if (!peer.closed) peer.socket.destroy()
}

// --- S1 / S2 / S5: fan-out ---
async function fanout () {
  const rooms = config.rooms
  const peers = config.peers
  const count = rooms * peers
  const sdp = 'v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n'.padEnd(config.payloadBytes || 1000, 'a=x')
  const tsMark = Buffer.from('"ts":')
  let recording = false
  let delivered = 0
  let latencies = []
  let lastMessageAt = now()

  // Latency of every `latencyEvery`-th delivery (a uniform sample, so percentiles hold).
  const latencyEvery = config.latencyEvery || 1
  const onText = (buf, start, end, receivedAt) => {
    lastMessageAt = receivedAt
    if (!isPublish(buf, start)) return
    delivered++
    if (!recording || delivered % latencyEvery !== 0) return
    const at = buf.indexOf(tsMark, start)
    if (at < 0 || at >= end) return
    const stop = buf.indexOf(0x2c, at) // ','
    latencies.push(receivedAt - Number(buf.toString('latin1', at + 5, stop)))
  }
  // Peer i of room r connects to urls[i % urls.length]: with two nodes every room spans both.
  const { peers: sockets, failed, firstError } = await connectAll(
    count, 100, i => urls[(i % peers) % urls.length], onText,
    async (peer, i) => {
      peer.send(`{"type":"subscribe","topics":["room-${Math.floor(i / peers)}"]}`)
      await peer.pingPong()
    },
    60000
  )
  if (failed) throw new Error(`${failed} of ${count} connections failed: ${firstError}`)

  // One frame per publish: the prefix and suffix are built once, the timestamp goes between.
  const prefix = []
  const suffix = []
  for (let i = 0; i < count; i++) {
    const room = Math.floor(i / peers)
    const to = room * peers + ((i % peers) + 1) % peers
    prefix.push(`{"type":"publish","topic":"room-${room}","ts":`)
    suffix.push(',"data":' + JSON.stringify({
      type: 'signal', from: `peer-${i}`, to: `peer-${to}`, token: 1712345678901.123,
      signal: { type: 'offer', sdp }
    }) + '}')
  }
  const frameBytes = Buffer.byteLength(prefix[0] + '0000000.000' + suffix[0])

  // Publish `rate` frames per second spread evenly over all peers for `seconds`; measure the
  // last `seconds - warmup` of it. While more than `maxOutstanding` deliveries are owed (sent x
  // fan-out - delivered), or a peer's unsent bytes pile up, publishes are skipped and counted as
  // shed: an overloaded server then runs at its capacity with a bounded queue instead of
  // building a backlog that would spill into the next step.
  const fanoutPerPublish = config.fanoutPerPublish || peers
  const maxOutstanding = config.maxOutstanding || 20000
  let owed = 0
  let cursor = 0
  const step = async (rate, seconds, warmup) => {
    const start = now()
    const stop = Math.min(start + seconds * 1000, deadline)
    let sent = 0
    let shed = 0
    let mark = null
    let windowStart = 0
    let deliveredAtWindow = 0
    let sentAtWindow = 0
    let shedAtWindow = 0
    latencies = []
    const timeline = []
    let nextTick = start + 500
    while (now() < stop) {
      const t = now()
      if (config.timeline && t >= nextTick) {
        nextTick += 500
        timeline.push([delivered, sent - shed, shed, owed - delivered])
      }
      if (mark === null && t - start >= warmup * 1000) {
        mark = cpuMark()
        windowStart = t
        deliveredAtWindow = delivered
        sentAtWindow = sent
        shedAtWindow = shed
        recording = true
      }
      const due = Math.min(Math.floor(((t - start) / 1000) * rate) - sent, 5000)
      for (let k = 0; k < due; k++) {
        const i = cursor
        cursor = (cursor + 1) % count
        const ws = sockets[i]
        sent++
        if (owed - delivered > maxOutstanding || ws.buffered > 64 * 1024) { shed++; continue }
        owed += fanoutPerPublish
        ws.send(prefix[i] + now().toFixed(3) + suffix[i])
      }
      await sleep(2)
    }
    recording = false
    const windowSeconds = (now() - windowStart) / 1000
    const cpu = cpuSince(mark)
    const result = {
      offeredPublishesPerSecond: round(rate),
      publishesPerSecond: round((sent - sentAtWindow - shedAtWindow) / windowSeconds),
      deliveredPerSecond: round((delivered - deliveredAtWindow) / windowSeconds),
      shed: shed - shedAtWindow,
      p50Ms: round(percentile(latencies, 50), 3),
      p99Ms: round(percentile(latencies, 99), 3),
      samples: latencies.length,
      ...cpu
    }
    if (config.timeline) result.timeline = timeline
    // Drain: wait until everything owed has arrived, or nothing has for 500 ms (at most 10 s),
    // so steps do not overlap; then forget what was lost.
    const drainUntil = Math.min(now() + 10000, deadline)
    while (now() < drainUntil && delivered < owed && now() - lastMessageAt < 500) await sleep(20)
    result.lost = owed - delivered
    owed = delivered
    return result
  }

  const out = { scenario: 'fanout', rooms, peers, connections: count, frameBytes }
  if (config.ramp) {
    const ramp = config.ramp
    const steps = []
    let rate = ramp.startRate
    let best = null
    let saturated = 0
    for (let n = 0; n < ramp.maxSteps && now() < deadline; n++) {
      const result = await step(rate, ramp.stepSeconds, ramp.warmupSeconds)
      steps.push(result)
      // A step is saturated when delivered/s grew less than 3% over the best so far, or the
      // server could not keep up (over 5% of the offered publishes shed because deliveries
      // were owed). Two saturated steps in a row end the ramp.
      const measured = result.offeredPublishesPerSecond * (ramp.stepSeconds - ramp.warmupSeconds)
      const grew = best === null || result.deliveredPerSecond > best.deliveredPerSecond * 1.03
      saturated = grew && result.shed <= 0.05 * measured ? 0 : saturated + 1
      if (best === null || result.deliveredPerSecond > best.deliveredPerSecond) best = result
      if (saturated >= 2) break
      rate *= ramp.factor
    }
    const loadRate = (ramp.latencyFraction * best.deliveredPerSecond) / fanoutPerPublish
    out.steps = steps
    out.maxDeliveredPerSecond = best.deliveredPerSecond
    out.atMax = best
    out.atFraction = { fraction: ramp.latencyFraction, ...await step(loadRate, ramp.latencySeconds, ramp.warmupSeconds) }
    // The same publish rate for every target (the reference's 70% rate, given by the runner),
    // so latency is also compared at equal load.
    if (ramp.referenceRate) {
      out.atReferenceRate = await step(ramp.referenceRate, ramp.latencySeconds, ramp.warmupSeconds)
    }
  } else {
    out.fixed = await step(config.rate, config.seconds, config.warmupSeconds)
  }
  await closeAll(sockets)
  return out
}

// --- S3: idle connections ---
async function idle () {
  const count = config.count
  const t0 = now()
  const mark = cpuMark()
  const { peers: sockets, failed, firstError } = await connectAll(
    count, config.parallel || 200, i => urls[i % urls.length], () => {},
    async (peer, i) => {
      peer.send(`{"type":"subscribe","topics":["idle-${i}"]}`)
      await peer.pingPong()
    },
    120000
  )
  const connectSeconds = (now() - t0) / 1000
  const cpu = cpuSince(mark)
  const open = sockets.filter(peer => !peer.closed).length
  // The runner reads the servers' memory now, then answers on stdin.
  console.log('READY')
  const lines = createInterface({ input: process.stdin })
  await Promise.race([new Promise(resolve => lines.once('line', resolve)), sleep(60000)])
  lines.close()
  await closeAll(sockets)
  return { scenario: 'idle', count, open, failed, firstError, connectSeconds: round(connectSeconds, 3), ...cpu }
}

// --- S4: churn ---
const MASK = Buffer.from([0x12, 0x34, 0x56, 0x78])
const clientFrame = (opcode, payload) => {
  const masked = Buffer.from(payload)
  for (let i = 0; i < masked.length; i++) masked[i] ^= MASK[i % 4]
  if (masked.length > 125) throw new Error('frame too long for this helper')
  return Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | masked.length]), MASK, masked])
}
const PONG = Buffer.from('"pong"')
const CLOSE_FRAME = clientFrame(0x8, Buffer.from([0x03, 0xe8])) // 1000
const handshake = port => 'GET / HTTP/1.1\r\nHost: 127.0.0.1:' + port + '\r\n' +
  'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n' +
  'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n'

async function churn () {
  const concurrency = config.concurrency
  const churnFrames = Array.from({ length: concurrency }, (_, w) => Buffer.concat([
    clientFrame(0x1, Buffer.from(`{"type":"subscribe","topics":["churn-${w}"]}`)),
    clientFrame(0x1, Buffer.from('{"type":"ping"}'))
  ]))
  const seconds = config.seconds
  const maxCycles = config.maxCycles || 1000000
  let cycles = 0
  let errors = 0
  const start = now()
  const stop = Math.min(start + seconds * 1000, deadline)
  const mark = cpuMark()
  // A raw client: the handshake and the masked frames are prebuilt bytes, so one cycle costs the
  // generator a connect, three writes and a few reads, much less than the server's work.
  const cycle = (w, n) => new Promise(resolve => {
    const url = new URL(urls[(w + n) % urls.length])
    let onChunk = null
    const socket = net.connect({
      port: Number(url.port),
      host: '127.0.0.1',
      onread: { buffer: READ_BUFFER, callback: (bytes, buf) => { onChunk(buf.subarray(0, bytes)) } }
    })
    const timer = setTimeout(() => { socket.destroy(); resolve(false) }, 5000)
    let state = 0 // 0 handshake, 1 waiting for pong, 2 closing
    let head = ''
    socket.setNoDelay(true)
    socket.on('connect', () => socket.write(handshake(url.port)))
    onChunk = data => {
      if (state === 0) {
        head += data.toString('latin1')
        const end = head.indexOf('\r\n\r\n')
        if (end < 0) return
        if (!head.startsWith('HTTP/1.1 101')) { socket.destroy(); return }
        state = 1
        socket.write(churnFrames[w])
        data = Buffer.from(head.slice(end + 4), 'latin1')
      }
      if (state === 1 && data.includes(PONG)) {
        state = 2
        socket.write(CLOSE_FRAME)
      }
    }
    socket.on('error', () => {})
    // The server closes TCP after the closing handshake (RFC 6455 §7.1.1).
    socket.on('close', () => { clearTimeout(timer); resolve(state === 2) })
  })
  const worker = async w => {
    for (let n = 0; now() < stop && cycles + errors < maxCycles; n++) {
      if (await cycle(w, n)) cycles++
      else errors++
    }
  }
  await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)))
  const wall = (now() - start) / 1000
  return {
    scenario: 'churn', concurrency, cycles, errors,
    cyclesPerSecond: round(cycles / wall), ...cpuSince(mark)
  }
}

const scenarios = { fanout, idle, churn }
const run = scenarios[config.scenario]
if (!run) throw new Error(`unknown scenario ${config.scenario}`)
const guard = setTimeout(() => {
  console.log(JSON.stringify({ error: 'generator time limit reached' }))
  process.exit(2)
}, (config.maxSeconds || 300) * 1000 + 15000)
run().then(result => {
  clearTimeout(guard)
  console.log(JSON.stringify(result))
  process.exit(0)
}, error => {
  console.log(JSON.stringify({ error: String(error && error.stack || error) }))
  process.exit(1)
})
