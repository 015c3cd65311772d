// The load generator: drives the topics protocol (y-webrtc / Flow-Like), the relay protocol's
// pipes, Signal-Fire and the PeerJS protocol over raw TCP sockets, and the rooms protocol
// (socket.io) with socket.io-client.
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
//   pipes   relay protocol pipes: pairs of /connection/a/b/doc + /connection/b/a/doc sockets,
//           each A sends binary frames of frameBytes to its B, at most `window` in flight per
//           pipe (S6, S7)
//   signalfire  Signal-Fire on /signal-fire: pairs of clients, each A sends offers to its B, at
//           most `window` requests outstanding per pair (S8)
//   peerjs-idle   the PeerJS protocol: count clients, each registered (OPEN); READY and stdin as
//           for idle (S9)
//   peerjs-relay  pairs of PeerJS clients sending CANDIDATE messages to each other, at most
//           `window` undelivered per direction (S10)
//   peerjs-churn  connect (to OPEN) + close cycles at a fixed concurrency (S11)
//   relay-idle    idle relay introduction sockets, each joined to a document of its own, connected
//           in `stages` (AT <n> on stdout after each, the runner answers on stdin) (S12)
//   relay-churn   connect /introduction, Join a document an anchor holds, receive the
//           Introduction, close, at a fixed concurrency (S13)
//   pipes with `rates`  an open-loop sweep of offered frame rates over the pipes (S14)
//   signalfire-idle  idle Signal-Fire clients, each welcomed, connected in stages (S15)
//   signalfire-sessions  pairs starting and accepting sessions, one in flight per pair (S16)
//   rooms-idle  socket.io clients (socket.io-client 4, WebSocket), two to a room, logged in and
//           joined, connected in stages (S17); `flavor` polysignal (wrtc-signal's flow) or
//           reference (rooms_reference.py / .mjs: connect, join, relay)
//   rooms-churn  connect, log in, join an anchor's room, disconnect, at a fixed concurrency (S18)
//   rooms-relay  pairs in rooms, each A relays session descriptions to its B, at most `window`
//           not yet received per pair (S19)

import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import { createInterface } from 'node:readline'

const config = JSON.parse(process.argv[2] || '{}')
// ws://127.0.0.1:<port>, with any path of printable ASCII (no space): nothing else is dialled.
const LOOPBACK_URL = /^ws:\/\/127\.0\.0\.1:\d{1,5}(\/[\x21-\x7e]*)?$/
const checkUrl = url => {
  if (typeof url !== 'string' || !LOOPBACK_URL.test(url)) {
    throw new Error(`not a loopback URL: ${url}`)
  }
  return url
}
const urls = config.urls || []
for (const url of urls) checkUrl(url)
if (urls.length === 0) throw new Error('config.urls is empty')
const serverPids = config.serverPids || []
const deadline = performance.now() + (config.maxSeconds || 300) * 1000

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const now = () => performance.now()

// --- CPU accounting ---
const TICKS = 100 // USER_HZ on Linux
// The servers' user and system CPU seconds.
const serverCpuTimes = () => {
  let user = 0
  let system = 0
  for (const pid of serverPids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      user += Number(fields[11]) / TICKS
      system += Number(fields[12]) / TICKS
    } catch {
      // the server is gone: its CPU stays as last read
    }
  }
  return { user, system }
}
const cpuMark = () => ({ wall: now(), own: process.cpuUsage(), server: serverCpuTimes() })
const cpuSince = mark => {
  const wall = (now() - mark.wall) / 1000
  const own = process.cpuUsage(mark.own)
  const server = serverCpuTimes()
  const user = server.user - mark.server.user
  const system = server.system - mark.server.system
  return {
    generatorCpu: round((own.user + own.system) / 1e6 / wall, 3),
    serverCpu: round((user + system) / wall, 3),
    // the share of the server's CPU spent in the kernel (system calls, loopback TCP)
    serverSystemShare: user + system > 0 ? round(system / (user + system), 3) : null
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
const HANDSHAKE = (port, path = '/') => Buffer.from('GET ' + path + ' HTTP/1.1\r\n' +
  'Host: 127.0.0.1:' + port + '\r\n' +
  'Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n' +
  'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n', 'latin1')
const HEAD_END = Buffer.from('\r\n\r\n')

// The header of a masked client frame with a zero mask key: 6, 8 or 14 bytes (7-, 16- or 64-bit
// payload length).
const MAX_CLIENT_FRAME = 16 * 1024 * 1024
const headLength = length => length < 126 ? 6 : length < 65536 ? 8 : 14
const writeHead = (frame, opcode, length) => {
  if (length > MAX_CLIENT_FRAME) throw new Error('frame too long for the generator')
  frame[0] = 0x80 | opcode
  let at = 2
  if (length < 126) {
    frame[1] = 0x80 | length
  } else if (length < 65536) {
    frame[1] = 0x80 | 126
    frame.writeUInt16BE(length, 2)
    at = 4
  } else {
    frame[1] = 0x80 | 127
    frame.writeBigUInt64BE(BigInt(length), 2)
    at = 10
  }
  frame.writeUInt32BE(0, at)
  return at + 4 // where the payload starts
}

// A masked client frame of an ASCII string, with a zero mask key.
const clientText = (text, opcode = 0x1) => {
  const frame = Buffer.allocUnsafe(headLength(text.length) + text.length)
  frame.latin1Write(text, writeHead(frame, opcode, text.length))
  return frame
}

// A masked binary client frame of `payload`, with a zero mask key (so the payload is copied as is).
const clientBinary = (payload, opcode = 0x2) => {
  const frame = Buffer.allocUnsafe(headLength(payload.length) + payload.length)
  payload.copy(frame, writeHead(frame, opcode, payload.length))
  return frame
}
const CLOSE_1000 = Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
const PING_FRAME = clientText('{"type":"ping"}')

// isPublish / isPong look at the 10th and 11th bytes of '{"type":"publish"' / '{"type":"pong"'.
const isPublish = (buf, start) => buf[start + 9] === 0x70 && buf[start + 10] === 0x75
const isPong = (buf, start) => buf[start + 9] === 0x70 && buf[start + 10] === 0x6f

const READ_BUFFER = Buffer.allocUnsafe(256 * 1024)
const BIG_FRAME = 16 * 1024 // a frame this large that spans TCP chunks is gathered in its own buffer

class RawPeer {
  // onText / onBinary (buf, start, end, receivedAt, peer) get each text / binary frame's payload
  // in place (valid during the call only).
  constructor (url, onText, onBinary = null) {
    const parsed = new URL(checkUrl(url))
    const port = Number(parsed.port)
    const path = (parsed.pathname || '/') + parsed.search
    this.onText = onText
    this.onBinary = onBinary
    this.rest = null
    // A frame of BIG_FRAME bytes or more that spans chunks: its buffer, and how much is filled.
    this.big = null
    this.bigFilled = 0
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
      this.socket.on('connect', () => this.socket.write(HANDSHAKE(port, path)))
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
    if (this.big !== null) {
      // The rest of a large frame goes straight into its buffer (one copy, not one per chunk).
      const big = this.big
      const take = Math.min(big.length - this.bigFilled, chunk.length)
      chunk.copy(big, this.bigFilled, 0, take)
      this.bigFilled += take
      if (this.bigFilled < big.length) return
      this.big = null
      this.frames(big, at)
      if (take === chunk.length) return
      chunk = chunk.subarray(take)
    }
    this.frames(this.rest ? Buffer.concat([this.rest, chunk]) : chunk, at)
  }

  // Hand every whole frame in `buf` to its handler; keep what is left for the next chunk.
  frames (buf, at) {
    const n = buf.length
    let off = 0
    let partial = 0 // the whole size of the frame cut off at the end, when its header is complete
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
      if (end > n) {
        partial = end - off
        break
      }
      const opcode = first & 0x0f
      if (opcode === 0x1) {
        if (this.onPong !== null && isPong(buf, start)) this.onPong()
        else this.onText(buf, start, end, at, this)
      } else if (opcode === 0x2) {
        if (this.onBinary !== null) this.onBinary(buf, start, end, at, this)
      } else if (opcode === 0x9) {
        this.socket.write(clientText(buf.toString('latin1', start, end), 0xa))
      }
      off = end
    }
    if (off < n && partial >= BIG_FRAME) {
      this.big = Buffer.allocUnsafe(partial)
      this.bigFilled = buf.copy(this.big, 0, off)
      this.rest = null
    } else {
      this.rest = off < n ? Buffer.from(buf.subarray(off)) : null
    }
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
// `peer.index` is i from the start, so handlers can tell peers apart before onOpen runs.
const connectAll = async (count, parallel, makeUrl, onText, onOpen, timeoutMs, onBinary = null) => {
  const peers = new Array(count)
  let next = 0
  let failed = 0
  let firstError = null
  const until = Math.min(deadline, now() + timeoutMs)
  const worker = async () => {
    while (next < count && now() < until) {
      const i = next++
      const peer = new RawPeer(makeUrl(i), onText, onBinary)
      peer.index = i
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
const STATUS_101 = Buffer.from('HTTP/1.1 101', 'latin1')

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
  // Per target: its port and the handshake bytes, built once.
  const targets = urls.map(url => {
    const port = Number(new URL(url).port)
    return { port, handshake: HANDSHAKE(port) }
  })
  const cycle = (w, n) => new Promise(resolve => {
    const target = targets[(w + n) % targets.length]
    let onChunk = null
    const socket = net.connect({
      port: target.port,
      host: '127.0.0.1',
      onread: { buffer: READ_BUFFER, callback: (bytes, buf) => { onChunk(buf.subarray(0, bytes)) } }
    })
    const timer = setTimeout(() => { socket.destroy(); resolve(false) }, 5000)
    let state = 0 // 0 handshake, 1 waiting for pong, 2 closing
    let head = null
    socket.setNoDelay(true)
    socket.on('connect', () => socket.write(target.handshake))
    onChunk = data => {
      if (state === 0) {
        // The response head usually arrives whole; a part is copied (the read buffer is shared).
        head = head === null ? data : Buffer.concat([head, data])
        const end = head.indexOf(HEAD_END)
        if (end < 0) {
          head = Buffer.from(head)
          return
        }
        if (head.compare(STATUS_101, 0, STATUS_101.length, 0, STATUS_101.length) !== 0) {
          socket.destroy()
          return
        }
        state = 1
        socket.write(churnFrames[w])
        data = head.subarray(end + 4)
        head = null
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

// --- shared by the closed-loop scenarios (S6-S8) ---
const latency = values => ({
  p50Ms: values.length ? round(percentile(values, 50), 3) : null,
  p99Ms: values.length ? round(percentile(values, 99), 3) : null,
  samples: values.length
})

// Wait until `done()`, or nothing changed in `progress()` for `quietMs`, or `maxMs` passed.
const drain = async (done, progress, quietMs, maxMs) => {
  const until = Math.min(now() + maxMs, deadline)
  let last = progress()
  let lastChange = now()
  while (!done() && now() < until && now() - lastChange < quietMs) {
    await sleep(20)
    const p = progress()
    if (p !== last) { last = p; lastChange = now() }
  }
}

// Run the closed loop for warmup + seconds: `start()` sends the first window, every receipt
// sends the next while `running` (the scenario's handlers read it); the figures are counted
// between the marks.
const measureWindow = async (warmupSeconds, seconds, counters, setRecording) => {
  const t0 = now()
  const warmEnd = Math.min(t0 + warmupSeconds * 1000, deadline)
  while (now() < warmEnd) await sleep(Math.min(50, Math.max(1, warmEnd - now())))
  const mark = cpuMark()
  const before = counters()
  const windowStart = now()
  setRecording(true)
  const stop = Math.min(windowStart + seconds * 1000, deadline)
  while (now() < stop) await sleep(Math.min(50, Math.max(1, stop - now())))
  setRecording(false)
  const after = counters()
  const windowSeconds = (now() - windowStart) / 1000
  return { before, after, windowSeconds, cpu: cpuSince(mark) }
}

// --- S6 / S7: relay protocol pipes ---
// A = /connection/a{i}/b{i}/doc{i}, B = /connection/b{i}/a{i}/doc{i}: the server pipes the two
// once both are open and forwards frames byte-exact. Each A sends binary frames of frameBytes to
// its B, at most `window` in flight (sent, not yet received by B); the first 8 bytes of each
// payload are the sender's performance.now() as a float64, for the one-way latency.
async function pipes () {
  const pairs = config.pairs
  const frameBytes = config.frameBytes
  const window = config.window
  const latencyEvery = config.latencyEvery || 1
  const checkEvery = config.checkEvery || 64
  let budget = config.maxFrames || 50000000 // frames the loop may send, at most
  if (!(frameBytes >= 16)) throw new Error('frameBytes must be at least 16')
  if (!(window >= 1)) throw new Error('window must be at least 1')
  const headBytes = headLength(frameBytes)
  // Every frame's payload after the timestamp: one shared, never changed buffer (a byte pattern,
  // so a sample of the frames B receives can be compared with it).
  const body = Buffer.allocUnsafe(frameBytes - 8)
  for (let k = 0; k < body.length; k++) body[k] = (k * 31 + 7) & 0xff
  const PROBE = clientBinary(Buffer.from('probe-00'))

  const sent = new Float64Array(pairs) // frames A sent (after the probe)
  const received = new Float64Array(pairs) // frames B received (after the probe)
  const probed = new Uint8Array(pairs)
  let probes = 0
  let running = false
  let recording = false
  let frames = 0
  let bytes = 0
  let badFrames = 0
  let latencies = []
  let lastFrameAt = now()
  let aSockets = null

  // A frame is its header and timestamp followed by the shared body (not copied). The frames for
  // one A within one read callback go out in one writev: the socket is corked at the first and
  // uncorked once the callback has returned.
  const corked = new Uint8Array(pairs)
  const uncork = i => {
    corked[i] = 0
    aSockets[i].socket.uncork()
  }
  const sendNext = i => {
    if (budget-- <= 0) return
    const head = Buffer.allocUnsafe(headBytes + 8)
    head.writeDoubleLE(now(), writeHead(head, 0x2, frameBytes))
    sent[i]++
    const socket = aSockets[i].socket
    if (!corked[i]) {
      corked[i] = 1
      socket.cork()
      process.nextTick(uncork, i)
    }
    socket.write(head)
    socket.write(body)
  }
  // B's frames: the probe first, then the loop's frames.
  const onBinary = (buf, start, end, receivedAt, peer) => {
    const i = peer.index
    lastFrameAt = receivedAt
    if (!probed[i]) {
      probed[i] = 1
      probes++
      return
    }
    received[i]++
    frames++
    bytes += end - start
    if (end - start !== frameBytes) badFrames++
    else if (frames % checkEvery === 0 && buf.compare(body, 0, body.length, start + 8, end)) badFrames++
    if (recording && frames % latencyEvery === 0) latencies.push(receivedAt - buf.readDoubleLE(start))
    if (running && sent[i] - received[i] < window) sendNext(i)
  }
  // Nothing else arrives on these pipes: A's receive nothing, B's only binary frames.
  let unexpected = 0
  const onUnexpected = () => { unexpected++ }
  // All A's first (the server holds each until its B arrives), then all B's; a B's index is its
  // pair's. With two nodes, B is on the other one.
  const a = await connectAll(
    pairs, 100, i => urls[i % urls.length] + `/connection/a${i}/b${i}/doc${i}`,
    onUnexpected, async () => {}, 60000, onUnexpected)
  if (a.failed) throw new Error(`${a.failed} of ${pairs} A sockets failed: ${a.firstError}`)
  const b = await connectAll(
    pairs, 100, i => urls[(i + 1) % urls.length] + `/connection/b${i}/a${i}/doc${i}`,
    onUnexpected, async () => {}, 60000, onBinary)
  if (b.failed) throw new Error(`${b.failed} of ${pairs} B sockets failed: ${b.firstError}`)
  aSockets = a.peers
  // Every pipe carries a probe before the loop starts: all pairs are piped.
  for (const peer of aSockets) peer.socket.write(PROBE)
  const probeUntil = Math.min(now() + 10000, deadline)
  while (probes < pairs && now() < probeUntil) await sleep(10)
  if (probes < pairs) throw new Error(`only ${probes} of ${pairs} pipes carried the probe in 10 s`)

  const inFlight = () => {
    let n = 0
    for (let i = 0; i < pairs; i++) n += sent[i] - received[i]
    return n
  }
  if (config.rates) {
    // S14: an open loop at each offered rate in turn (frames/s over all pipes, spread evenly,
    // sent every 10 ms); a pipe with `maxInFlight` frames undelivered skips its turn (shed).
    const steps = []
    const maxInFlight = config.maxInFlight || 64
    let next = 0
    for (const rate of config.rates) {
      if (now() > deadline - 10000) break
      const stepStart = now()
      const warmEnd = stepStart + (config.warmupSeconds || 0.5) * 1000
      const end = warmEnd + config.stepSeconds * 1000
      let issued = 0
      let offered = 0
      let shed = 0
      let mark = null
      let before = 0
      let windowStart = 0
      while (now() < end && now() < deadline) {
        const t = now()
        if (mark === null && t >= warmEnd) {
          mark = cpuMark(); before = frames; offered = 0; shed = 0; windowStart = t
          latencies = []; recording = true
        }
        const due = Math.floor(rate * (t - stepStart) / 1000) - issued
        for (let k = 0; k < due && budget > 0; k++) {
          const i = next++ % pairs
          issued++
          offered++
          if (sent[i] - received[i] >= maxInFlight) shed++
          else sendNext(i)
        }
        await sleep(10)
      }
      recording = false
      const seconds = (now() - windowStart) / 1000
      const delivered = frames - before
      steps.push({
        offeredPerSecond: round(offered / seconds),
        deliveredPerSecond: round(delivered / seconds),
        shed,
        ...latency(latencies),
        ...(mark ? cpuSince(mark) : {})
      })
      await drain(() => inFlight() === 0, () => frames, 1000, 5000)
    }
    const closedSockets = [...a.peers, ...b.peers].filter(peer => peer.closed).length
    await closeAll([...a.peers, ...b.peers])
    return {
      scenario: 'pipes-sweep', pairs, frameBytes, steps, lost: inFlight(), closedSockets,
      badFrames, unexpected
    }
  }
  running = true
  for (let i = 0; i < pairs; i++) for (let k = 0; k < window; k++) sendNext(i)
  const { before, after, windowSeconds, cpu } = await measureWindow(
    config.warmupSeconds, config.seconds, () => ({ frames, bytes }),
    on => { if (on) latencies = []; recording = on })
  running = false
  await drain(() => inFlight() === 0, () => frames, 2000, 10000)
  let stalledPipes = 0
  for (let i = 0; i < pairs; i++) if (sent[i] > received[i]) stalledPipes++
  const closedSockets = [...a.peers, ...b.peers].filter(peer => peer.closed).length
  await closeAll([...a.peers, ...b.peers])
  const windowFrames = after.frames - before.frames
  return {
    scenario: 'pipes',
    pairs,
    frameBytes,
    window,
    framesPerSecond: round(windowFrames / windowSeconds),
    megabytesPerSecond: round((after.bytes - before.bytes) / windowSeconds / 1e6, 3),
    ...latency(latencies),
    windowSeconds: round(windowSeconds, 3),
    framesSent: sent.reduce((x, y) => x + y, 0),
    framesReceived: frames,
    lost: inFlight(),
    stalledPipes,
    closedSockets,
    badFrames,
    unexpected,
    idleMsAtEnd: round(now() - lastFrameAt, 1),
    ...cpu
  }
}

// --- S8: Signal-Fire ---
// 2 x pairs clients on /signal-fire; each first receives {"cmd":"welcome","data":{"id":..}}.
// Each A sends offers to its B; the server acks A ({"id":<same>,"ok":true}) and relays to B
// ({"id":<new>,"cmd":"offer","origin":<A>,"data":<as sent>}). A request is outstanding until it
// is both acked and relayed (or refused); at most `window` per pair. The sender's
// performance.now() rides in the SDP's o= line (the session id), which the server relays as is.
async function signalfire () {
  const pairs = config.pairs
  const window = config.window
  let budget = config.maxRequests || 50000000 // requests the loop may send, at most
  const sdpBytes = config.sdpBytes || 200
  const latencyEvery = config.latencyEvery || 1
  const path = config.path || '/signal-fire'
  if (!(window >= 1)) throw new Error('window must be at least 1')
  const count = 2 * pairs
  const ids = new Array(count).fill(null)
  const welcomed = new Array(count).fill(null)
  const sent = new Float64Array(pairs)
  const acked = new Float64Array(pairs)
  const relayed = new Float64Array(pairs)
  const refused = new Float64Array(pairs)
  const checked = new Uint8Array(pairs)
  let running = false
  let recording = false
  let acks = 0
  let relays = 0
  let errors = 0
  let firstError = null
  let unexpected = 0
  let misrouted = 0
  let latencies = []
  let progress = 0
  let aSockets = null
  const OK_TRUE = Buffer.from('"ok":true')
  const OK_FALSE = Buffer.from('"ok":false')
  const CMD_OFFER = Buffer.from('"cmd":"offer"')
  const TS_MARK = Buffer.from('o=- ')

  // The request: {"id":"r<i>-<n>","cmd":"offer","target":"<B>","data":{"offer":{"type":"offer",
  // "sdp":"v=0\r\no=- <ts> 2 IN IP4 127.0.0.1\r\n..."}}} with the SDP padded to sdpBytes.
  const sdpTail = ' 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n'
  const padBytes = Math.max(0, sdpBytes - 'v=0\r\no=- 0000000.000'.length - sdpTail.length)
  const sdpPad = 'a=x'.repeat(Math.ceil(padBytes / 3)).slice(0, padBytes)
  const escaped = text => JSON.stringify(text).slice(1, -1)
  const middle = []
  const sdpStart = escaped('v=0\r\no=- ')
  const suffix = escaped(sdpTail + sdpPad) + '"}}}'
  const sendNext = i => {
    const n = sent[i]++
    aSockets[i].send(`{"id":"r${i}-${n}` + middle[i] + sdpStart + now().toFixed(3) + suffix)
  }
  const pump = i => {
    while (running && budget > 0 && sent[i] - Math.min(acked[i], relayed[i] + refused[i]) < window) {
      budget--
      sendNext(i)
    }
  }
  const onText = (buf, start, end, receivedAt, peer) => {
    const index = peer.index
    progress++
    if (ids[index] === null) {
      // The first frame: the welcome with this client's id.
      let message = null
      try { message = JSON.parse(buf.toString('utf8', start, end)) } catch {}
      const id = message && message.cmd === 'welcome' && message.data && message.data.id
      if (typeof id === 'string') {
        ids[index] = id
        if (welcomed[index]) welcomed[index]()
      } else {
        unexpected++
      }
      return
    }
    if (index < pairs) {
      // A: an ack or a refusal of one of its requests.
      const i = index
      const okTrue = buf.indexOf(OK_TRUE, start)
      if (okTrue >= 0 && okTrue < end) {
        acked[i]++
        acks++
      } else {
        const okFalse = buf.indexOf(OK_FALSE, start)
        if (okFalse >= 0 && okFalse < end) {
          acked[i]++
          refused[i]++
          errors++
          if (firstError === null) {
            firstError = buf.toString('utf8', start, Math.min(end, start + 300))
          }
        } else {
          unexpected++
          return
        }
      }
      pump(i)
      return
    }
    // B: a relayed offer from its A.
    const i = index - pairs
    const cmd = buf.indexOf(CMD_OFFER, start)
    if (cmd < 0 || cmd >= end) { unexpected++; return }
    relayed[i]++
    relays++
    if (!checked[i]) {
      // The first relay of each pair, in full: from its A, the data as A sent it.
      checked[i] = 1
      let message = null
      try { message = JSON.parse(buf.toString('utf8', start, end)) } catch {}
      const sdp = message && message.data && message.data.offer && message.data.offer.sdp
      const whole = typeof sdp === 'string' && sdp.endsWith(sdpTail + sdpPad)
      if (!message || message.origin !== ids[i] || !whole) misrouted++
    }
    if (recording && relays % latencyEvery === 0) {
      const at = buf.indexOf(TS_MARK, cmd)
      if (at >= 0 && at < end) {
        const stop = buf.indexOf(0x20, at + TS_MARK.length)
        latencies.push(receivedAt - Number(buf.toString('latin1', at + TS_MARK.length, stop)))
      }
    }
    pump(i)
  }
  const { peers: sockets, failed, firstError: connectError } = await connectAll(
    count, 100, i => urls[(i < pairs ? i : i + 1) % urls.length] + path, onText,
    (peer, i) => ids[i] !== null ? undefined : new Promise(resolve => { welcomed[i] = resolve }),
    60000
  )
  if (failed) throw new Error(`${failed} of ${count} connections failed: ${connectError}`)
  if (ids.some(id => id === null)) throw new Error('a client got no welcome')
  aSockets = sockets.slice(0, pairs)
  for (let i = 0; i < pairs; i++) {
    middle.push(`","cmd":"offer","target":"${ids[pairs + i]}",` +
      '"data":{"offer":{"type":"offer","sdp":"')
  }
  const requestBytes = Buffer.byteLength('{"id":"r0-0' + middle[0] + sdpStart + '0000.000' + suffix)

  running = true
  for (let i = 0; i < pairs; i++) pump(i)
  const { before, after, windowSeconds, cpu } = await measureWindow(
    config.warmupSeconds, config.seconds, () => ({ acks, relays, errors }),
    on => { if (on) latencies = []; recording = on })
  running = false
  const outstanding = () => {
    let n = 0
    for (let i = 0; i < pairs; i++) n += sent[i] - Math.min(acked[i], relayed[i] + refused[i])
    return n
  }
  await drain(() => outstanding() === 0, () => progress, 2000, 10000)
  const closedSockets = sockets.filter(peer => peer.closed).length
  await closeAll(sockets)
  return {
    scenario: 'signalfire',
    pairs,
    window,
    requestBytes,
    relaysPerSecond: round((after.relays - before.relays) / windowSeconds),
    acksPerSecond: round((after.acks - before.acks) / windowSeconds),
    errors: after.errors - before.errors,
    errorsTotal: errors,
    firstError,
    ...latency(latencies),
    windowSeconds: round(windowSeconds, 3),
    requestsSent: sent.reduce((x, y) => x + y, 0),
    lost: outstanding(),
    misrouted,
    unexpected,
    closedSockets,
    ...cpu
  }
}

// --- S9-S11: the PeerJS protocol ---
// A client opens ws://host:port{path}?key=<key>&id=<id>&token=<token>&version=1.5.4 (path
// /peerjs: the server's path / plus "peerjs"); the server answers {"type":"OPEN"} once the id is
// registered (or {"type":"ERROR"|"ID-TAKEN",..} and closes). A client sends
// {"type":"OFFER"|"ANSWER"|"CANDIDATE","dst":<id>,"payload":..} and the server delivers
// {"type":..,"src":<sender>,"dst":..,"payload":..} to dst; {"type":"HEARTBEAT"} every 5 s keeps a
// client alive (the PeerJS client's pingInterval). Ids are UUIDs, as GET {path}peerjs/id hands
// out; tokens are random base-36 strings, as the PeerJS client makes them.
const PEERJS_VERSION = '1.5.4'
const peerjsPath = () => config.path || '/peerjs'
const peerjsKey = () => config.key || 'peerjs'
const peerjsToken = () => Math.random().toString(36).slice(2)
const peerjsQuery = (id, token) =>
  `?key=${peerjsKey()}&id=${id}&token=${token}&version=${PEERJS_VERSION}`
const OPEN_MARK = Buffer.from('"OPEN"')
const PEERJS_REFUSALS = [Buffer.from('"ERROR"'), Buffer.from('"ID-TAKEN"')]
const HEARTBEAT = clientText('{"type":"HEARTBEAT"}')
const has = (buf, mark, start, end) => {
  const at = buf.indexOf(mark, start)
  return at >= 0 && at + mark.length <= end
}
// A CANDIDATE payload as the PeerJS client sends one for a data connection.
const CANDIDATE_PAYLOAD = {
  candidate: {
    candidate: 'candidate:842163049 1 udp 1677729535 192.0.2.1 3478 typ srflx raddr 0.0.0.0 ' +
      'rport 0 generation 0 ufrag abcd network-cost 999',
    sdpMLineIndex: 0,
    sdpMid: '0'
  },
  type: 'data',
  connectionId: 'dc_abc123'
}
const sameJson = (a, b) => {
  if (a === b) return true
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false
  const keys = Object.keys(a)
  if (keys.length !== Object.keys(b).length) return false
  return keys.every(k => Object.hasOwn(b, k) && sameJson(a[k], b[k]))
}

// Open `count` PeerJS clients (at most `parallel` handshakes at a time), each until its OPEN.
// `onFrame(buf, start, end, at, peer)` gets every frame after a client's OPEN.
const connectPeerjs = (count, parallel, ids, onFrame, timeoutMs) => {
  const opened = new Array(count).fill(null)
  const refused = []
  const onText = (buf, start, end, at, peer) => {
    const i = peer.index
    if (opened[i] !== true) {
      if (has(buf, OPEN_MARK, start, end)) {
        const resolve = opened[i]
        opened[i] = true
        if (resolve) resolve()
      } else {
        refused.push(buf.toString('utf8', start, Math.min(end, start + 200)))
      }
      return
    }
    onFrame(buf, start, end, at, peer)
  }
  const path = peerjsPath()
  return connectAll(
    count, parallel, i => urls[i % urls.length] + path + peerjsQuery(ids[i], peerjsToken()),
    onText,
    (peer, i) => opened[i] === true ? undefined : new Promise((resolve, reject) => {
      opened[i] = resolve
      peer.socket.once('close', () => reject(new Error(
        `closed before OPEN${refused.length ? ': ' + refused[refused.length - 1] : ''}`)))
    }),
    timeoutMs
  ).then(result => ({ ...result, refused }))
}

// S9: idle PeerJS clients, each OPENed; READY when all are, closed when a line arrives on stdin.
async function peerjsIdle () {
  const count = config.count
  const ids = Array.from({ length: count }, () => randomUUID())
  const t0 = now()
  const mark = cpuMark()
  let unexpected = 0
  const { peers: sockets, failed, firstError, refused } = await connectPeerjs(
    count, config.parallel || 200, ids, () => { unexpected++ }, 120000)
  const connectSeconds = (now() - t0) / 1000
  const cpu = cpuSince(mark)
  const open = sockets.filter(peer => !peer.closed).length
  console.log('READY')
  const lines = createInterface({ input: process.stdin })
  await Promise.race([new Promise(resolve => lines.once('line', resolve)), sleep(60000)])
  lines.close()
  const closedByServer = sockets.filter(peer => peer.closed).length
  await closeAll(sockets)
  return {
    scenario: 'peerjs-idle', count, open, failed, firstError, refused: refused.slice(0, 3),
    closedByServer, unexpected, connectSeconds: round(connectSeconds, 3), ...cpu
  }
}

// S10: `pairs` pairs of PeerJS clients; each client sends CANDIDATE messages to its partner, at
// most `window` per direction sent and not yet delivered (a closed loop both ways: a client sends
// its next when the partner has received one). Messages over one socket keep their order through
// the server, so a direction's send times are a ring of `window` entries, read back in order for
// the latency. The first delivery of each direction and every `checkEvery`-th are parsed and
// checked in full (type, src, dst, payload as sent); every delivery's length is checked against
// the first one's.
async function peerjsRelay () {
  const pairs = config.pairs
  const window = config.window
  const latencyEvery = config.latencyEvery || 1
  const checkEvery = config.checkEvery || 64
  const heartbeatMs = config.heartbeatMs || 5000
  let budget = config.maxMessages || 50000000 // messages the loop may send, at most
  if (!(window >= 1)) throw new Error('window must be at least 1')
  const count = 2 * pairs
  const partner = c => (c < pairs ? c + pairs : c - pairs)
  const ids = Array.from({ length: count }, () => randomUUID())
  // Client c's frame to its partner, built once and written as is (never changed).
  const texts = ids.map((_, c) => JSON.stringify({
    type: 'CANDIDATE', dst: ids[partner(c)], payload: CANDIDATE_PAYLOAD
  }))
  const frames = texts.map(text => clientText(text))
  const sent = new Float64Array(count) // by sender
  const received = new Float64Array(count) // by sender: its messages the partner received
  const sendTimes = new Float64Array(count * window)
  const lengths = new Int32Array(count) // by sender: the checked length of its deliveries
  let running = false
  let recording = false
  let delivered = 0
  let badFrames = 0
  let firstBad = null
  let unexpected = 0
  let firstUnexpected = null
  let heartbeats = 0
  let latencies = []
  let progress = 0
  let sockets = null
  const CANDIDATE_MARK = Buffer.from('"CANDIDATE"')

  const corked = new Uint8Array(count)
  const uncork = c => {
    corked[c] = 0
    sockets[c].socket.uncork()
  }
  const pump = c => {
    const socket = sockets[c].socket
    while (running && budget > 0 && sent[c] - received[c] < window) {
      budget--
      sendTimes[c * window + (sent[c] % window)] = now()
      sent[c]++
      if (!corked[c]) {
        corked[c] = 1
        socket.cork()
        process.nextTick(uncork, c)
      }
      socket.write(frames[c])
    }
  }
  const check = (buf, start, end, c, d) => {
    let message = null
    try { message = JSON.parse(buf.toString('utf8', start, end)) } catch {}
    const ok = message !== null && message.type === 'CANDIDATE' && message.src === ids[c] &&
      message.dst === ids[d] && sameJson(message.payload, CANDIDATE_PAYLOAD)
    if (!ok) {
      badFrames++
      if (firstBad === null) firstBad = buf.toString('utf8', start, Math.min(end, start + 300))
    }
    return ok
  }
  const onFrame = (buf, start, end, at, peer) => {
    progress++
    const d = peer.index
    const c = partner(d)
    if (!has(buf, CANDIDATE_MARK, start, end)) {
      unexpected++
      if (firstUnexpected === null) {
        firstUnexpected = buf.toString('utf8', start, Math.min(end, start + 300))
      }
      return
    }
    const n = received[c]++
    delivered++
    if (lengths[c] === 0) {
      if (check(buf, start, end, c, d)) lengths[c] = end - start
    } else if (end - start !== lengths[c]) {
      badFrames++
      if (firstBad === null) firstBad = buf.toString('utf8', start, Math.min(end, start + 300))
    } else if (delivered % checkEvery === 0) {
      check(buf, start, end, c, d)
    }
    if (recording && delivered % latencyEvery === 0) {
      latencies.push(at - sendTimes[c * window + (n % window)])
    }
    pump(c)
  }
  const connected = await connectPeerjs(count, 100, ids, onFrame, 60000)
  if (connected.failed) {
    throw new Error(`${connected.failed} of ${count} clients failed: ${connected.firstError}`)
  }
  sockets = connected.peers
  // The PeerJS client's heartbeat, every 5 s from each client (spread over the interval).
  let beat = 0
  const beater = setInterval(() => {
    for (let k = 0; k < Math.ceil(count / 10); k++) {
      const peer = sockets[beat++ % count]
      if (!peer.closed) { peer.socket.write(HEARTBEAT); heartbeats++ }
    }
  }, heartbeatMs / 10)

  running = true
  for (let c = 0; c < count; c++) pump(c)
  const { before, after, windowSeconds, cpu } = await measureWindow(
    config.warmupSeconds, config.seconds, () => ({ delivered }),
    on => { if (on) latencies = []; recording = on })
  running = false
  const inFlight = () => {
    let n = 0
    for (let c = 0; c < count; c++) n += sent[c] - received[c]
    return n
  }
  await drain(() => inFlight() === 0, () => progress, 2000, 10000)
  clearInterval(beater)
  const closedSockets = sockets.filter(peer => peer.closed).length
  await closeAll(sockets)
  return {
    scenario: 'peerjs-relay',
    pairs,
    window,
    messageBytes: texts[0].length,
    deliveredPerSecond: round((after.delivered - before.delivered) / windowSeconds),
    ...latency(latencies),
    windowSeconds: round(windowSeconds, 3),
    messagesSent: sent.reduce((x, y) => x + y, 0),
    messagesDelivered: delivered,
    heartbeats,
    lost: inFlight(),
    badFrames,
    firstBad,
    unexpected,
    firstUnexpected,
    closedSockets,
    ...cpu
  }
}

// S11: churn: `concurrency` loops of connect, OPEN, close (closing handshake, then the server
// closes TCP), each cycle with a new id, for `seconds`.
async function peerjsChurn () {
  const concurrency = config.concurrency
  const seconds = config.seconds
  const maxCycles = config.maxCycles || 1000000
  const path = peerjsPath()
  const tokens = Array.from({ length: concurrency }, peerjsToken)
  let cycles = 0
  let errors = 0
  let firstError = null
  const start = now()
  const stop = Math.min(start + seconds * 1000, deadline)
  const mark = cpuMark()
  const ports = urls.map(url => Number(new URL(url).port))
  const fail = text => {
    errors++
    if (firstError === null) firstError = text
  }
  const cycle = (w, n) => new Promise(resolve => {
    const port = ports[(w + n) % ports.length]
    let onChunk = null
    const socket = net.connect({
      port,
      host: '127.0.0.1',
      onread: { buffer: READ_BUFFER, callback: (bytes, buf) => { onChunk(buf.subarray(0, bytes)) } }
    })
    const timer = setTimeout(() => { socket.destroy(); resolve('timeout') }, 5000)
    let state = 0 // 0 handshake, 1 waiting for OPEN, 2 closing
    let data = null
    let refusal = null
    socket.setNoDelay(true)
    socket.on('connect', () => socket.write(HANDSHAKE(port, path + peerjsQuery(randomUUID(), tokens[w]))))
    onChunk = chunk => {
      // What arrives before the close is small; it is kept (copied: the read buffer is shared).
      data = data === null ? Buffer.from(chunk) : Buffer.concat([data, chunk])
      if (state === 0) {
        const end = data.indexOf(HEAD_END)
        if (end < 0) return
        if (data.compare(STATUS_101, 0, STATUS_101.length, 0, STATUS_101.length) !== 0) {
          refusal = data.toString('latin1', 0, 60)
          socket.destroy()
          return
        }
        state = 1
        data = data.subarray(end + 4)
      }
      if (state === 1) {
        if (data.includes(OPEN_MARK)) {
          state = 2
          socket.write(CLOSE_FRAME)
        } else if (PEERJS_REFUSALS.some(mark => data.includes(mark))) {
          refusal = data.toString('utf8', 0, 200)
          socket.destroy()
        }
      }
    }
    socket.on('error', () => {})
    socket.on('close', () => {
      clearTimeout(timer)
      resolve(state === 2 ? null : (refusal || `closed in state ${state}`))
    })
  })
  const worker = async w => {
    for (let n = 0; now() < stop && cycles + errors < maxCycles; n++) {
      const error = await cycle(w, n)
      if (error === null) cycles++
      else fail(error)
    }
  }
  await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)))
  const wall = (now() - start) / 1000
  return {
    scenario: 'peerjs-churn', concurrency, cycles, errors, firstError,
    cyclesPerSecond: round(cycles / wall), ...cpuSince(mark)
  }
}

// --- S12-S13: the relay protocol's introductions (msgpack, as @localfirst/relay 4.x) ---
// The few msgpack shapes a relay 4.x client sends: maps of short strings and string arrays.
const msgpackString = text => {
  const bytes = Buffer.from(text)
  if (bytes.length < 32) return Buffer.concat([Buffer.from([0xa0 | bytes.length]), bytes])
  if (bytes.length < 256) return Buffer.concat([Buffer.from([0xd9, bytes.length]), bytes])
  throw new Error('string too long for this helper')
}
const msgpackJoin = documentIds => Buffer.concat([
  Buffer.from([0x82]), msgpackString('type'), msgpackString('Join'),
  msgpackString('documentIds'), Buffer.from([0x90 | documentIds.length]),
  ...documentIds.map(msgpackString)
])
const INTRODUCTION_MARK = Buffer.from('Introduction')

// Connect `count` clients in `stages` steps; after each the runner is told `AT <open>` on stdout
// and reads the servers' memory, then answers on stdin (memory against connection count).
const stagedConnect = async (count, stages, connectStage) => {
  const lines = createInterface({ input: process.stdin })
  const waiting = []
  lines.on('line', () => { const w = waiting.shift(); if (w) w() })
  const all = []
  let failed = 0
  let firstError = null
  const t0 = now()
  const mark = cpuMark()
  for (let s = 1; s <= stages; s++) {
    const from = Math.floor(count * (s - 1) / stages)
    const to = Math.floor(count * s / stages)
    const r = await connectStage(from, to)
    all.push(...r.peers)
    failed += r.failed
    firstError = firstError || r.firstError
    if (s < stages) {
      console.log(`AT ${all.filter(peer => !peer.closed).length}`)
      await Promise.race([new Promise(resolve => waiting.push(resolve)), sleep(30000)])
    }
  }
  const connectSeconds = (now() - t0) / 1000
  const cpu = cpuSince(mark)
  const open = all.filter(peer => !peer.closed).length
  console.log('READY')
  await Promise.race([new Promise(resolve => waiting.push(resolve)), sleep(60000)])
  lines.close()
  const closedByServer = all.filter(peer => peer.closed).length
  await closeAll(all)
  return { count, open, failed, firstError, closedByServer, connectSeconds: round(connectSeconds, 3), ...cpu }
}

// S12: idle /introduction/idle<i> sockets, each joined (msgpack Join) to a document of its own.
async function relayIdle () {
  let unexpected = 0
  const result = await stagedConnect(config.count, config.stages || 1, (from, to) => connectAll(
    to - from, config.parallel || 200, k => urls[(from + k) % urls.length] + `/introduction/idle${from + k}`,
    () => { unexpected++ },
    async peer => { peer.socket.write(clientBinary(msgpackJoin([`idle-doc-${peer.index + from}`]))) },
    120000, () => { unexpected++ }))
  return { scenario: 'relay-idle', ...result, unexpected }
}

// S13: introduction churn. `anchors` sockets stay joined to doc<k> each; every cycle opens
// /introduction/c<w>-<n>, joins doc<w % anchors>, waits for the Introduction of that anchor,
// and closes (the closing handshake; the server then closes TCP).
async function relayChurn () {
  const anchorsCount = config.anchors || 100
  const concurrency = config.concurrency
  const maxCycles = config.maxCycles || 1000000
  let anchorIntroductions = 0
  const anchors = await connectAll(
    anchorsCount, 100, k => urls[k % urls.length] + `/introduction/anchor${k}`, () => {},
    async peer => { peer.socket.write(clientBinary(msgpackJoin([`churn-doc${peer.index}`]))) },
    60000, () => { anchorIntroductions++ })
  if (anchors.failed) throw new Error(`${anchors.failed} anchors failed: ${anchors.firstError}`)
  await sleep(500) // the anchors' Joins are handled (nothing answers a Join that shares nothing)
  const joins = Array.from({ length: concurrency }, (_, w) =>
    clientBinary(msgpackJoin([`churn-doc${w % anchorsCount}`])))
  let cycles = 0
  let errors = 0
  let firstError = null
  const start = now()
  const stop = Math.min(start + config.seconds * 1000, deadline)
  const mark = cpuMark()
  const ports = urls.map(url => Number(new URL(url).port))
  const cycle = (w, n) => new Promise(resolve => {
    const port = ports[(w + n) % ports.length]
    let onChunk = null
    const socket = net.connect({
      port,
      host: '127.0.0.1',
      onread: { buffer: READ_BUFFER, callback: (bytes, buf) => { onChunk(buf.subarray(0, bytes)) } }
    })
    const timer = setTimeout(() => { socket.destroy(); resolve('timeout') }, 5000)
    let state = 0 // 0 handshake, 1 waiting for the Introduction, 2 closing
    let data = null
    socket.setNoDelay(true)
    socket.on('connect', () => socket.write(HANDSHAKE(port, `/introduction/c${w}-${n}`)))
    onChunk = chunk => {
      data = data === null ? Buffer.from(chunk) : Buffer.concat([data, chunk])
      if (state === 0) {
        const end = data.indexOf(HEAD_END)
        if (end < 0) return
        if (data.compare(STATUS_101, 0, STATUS_101.length, 0, STATUS_101.length) !== 0) {
          socket.destroy()
          return
        }
        state = 1
        socket.write(joins[w])
        data = data.subarray(end + 4)
      }
      if (state === 1 && data.includes(INTRODUCTION_MARK)) {
        state = 2
        socket.write(CLOSE_FRAME)
      }
    }
    socket.on('error', () => {})
    socket.on('close', () => { clearTimeout(timer); resolve(state === 2 ? null : `closed in state ${state}`) })
  })
  const worker = async w => {
    for (let n = 0; now() < stop && cycles + errors < maxCycles; n++) {
      const error = await cycle(w, n)
      if (error === null) cycles++
      else { errors++; firstError = firstError || error }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)))
  const wall = (now() - start) / 1000
  const cpu = cpuSince(mark)
  await closeAll(anchors.peers)
  return {
    scenario: 'relay-churn', concurrency, anchors: anchorsCount, cycles, errors, firstError,
    anchorIntroductions, cyclesPerSecond: round(cycles / wall), ...cpu
  }
}

// --- S15-S16: Signal-Fire idle clients and sessions ---
const WELCOME_MARK = Buffer.from('"cmd":"welcome"')

// S15: idle clients on /signal-fire, each welcomed (its id assigned).
async function signalfireIdle () {
  const path = config.path || '/signal-fire'
  let unexpected = 0
  const result = await stagedConnect(config.count, config.stages || 1, (from, to) => {
    const waiting = new Map()
    const got = new Set() // welcomed before onOpen ran (the welcome came with the handshake)
    return connectAll(
      to - from, config.parallel || 200, k => urls[(from + k) % urls.length] + path,
      (buf, start, end, at, peer) => {
        const at2 = buf.indexOf(WELCOME_MARK, start)
        if (at2 < 0 || at2 >= end || got.has(peer.index)) { unexpected++; return }
        got.add(peer.index)
        const done = waiting.get(peer.index)
        if (done) done()
      },
      peer => got.has(peer.index) ? undefined : new Promise(resolve => { waiting.set(peer.index, resolve) }),
      120000)
  })
  return { scenario: 'signalfire-idle', ...result, unexpected }
}

// S16: sessions. `pairs` pairs; A sends session-start to its B, B answers session-accept as soon
// as the relayed session-start arrives, and A starts the next session when the relayed accept
// reaches it (one session in flight per pair). Every request is acked; a refusal is an error.
async function signalfireSessions () {
  const pairs = config.pairs
  const path = config.path || '/signal-fire'
  const count = 2 * pairs
  const ids = new Array(count).fill(null)
  const welcomed = new Array(count).fill(null)
  const startedAt = new Float64Array(pairs)
  const serial = new Float64Array(pairs)
  let running = false
  let recording = false
  let sessions = 0
  let acks = 0
  let errors = 0
  let firstError = null
  let unexpected = 0
  let latencies = []
  let budget = config.maxSessions || 10000000
  let sockets = null
  const START = Buffer.from('"cmd":"session-start"')
  const ACCEPT = Buffer.from('"cmd":"session-accept"')
  const OK_TRUE = Buffer.from('"ok":true')
  const OK_FALSE = Buffer.from('"ok":false')
  const begin = i => {
    if (!running || budget-- <= 0) return
    startedAt[i] = now()
    sockets[i].send(`{"id":"s${i}-${serial[i]++}","cmd":"session-start","target":"${ids[pairs + i]}"}`)
  }
  const inside = (mark, buf, start, end) => { const at = buf.indexOf(mark, start); return at >= 0 && at < end }
  const onText = (buf, start, end, receivedAt, peer) => {
    const index = peer.index
    if (ids[index] === null) {
      let message = null
      try { message = JSON.parse(buf.toString('utf8', start, end)) } catch {}
      const id = message && message.cmd === 'welcome' && message.data && message.data.id
      if (typeof id === 'string') { ids[index] = id; if (welcomed[index]) welcomed[index]() } else unexpected++
      return
    }
    if (inside(OK_TRUE, buf, start, end)) { acks++; return }
    if (inside(OK_FALSE, buf, start, end)) {
      errors++
      firstError = firstError || buf.toString('utf8', start, Math.min(end, start + 200))
      if (index < pairs) begin(index)
      return
    }
    if (index >= pairs && inside(START, buf, start, end)) {
      const i = index - pairs
      sockets[index].send(`{"id":"a${i}-${serial[i]}","cmd":"session-accept","target":"${ids[i]}"}`)
      return
    }
    if (index < pairs && inside(ACCEPT, buf, start, end)) {
      sessions++
      if (recording) latencies.push(receivedAt - startedAt[index])
      begin(index)
      return
    }
    unexpected++
  }
  const connected = await connectAll(
    count, 100, i => urls[(i < pairs ? i : i + 1) % urls.length] + path, onText,
    (peer, i) => ids[i] !== null ? undefined : new Promise(resolve => { welcomed[i] = resolve }),
    60000)
  if (connected.failed) throw new Error(`${connected.failed} of ${count} connections failed: ${connected.firstError}`)
  sockets = connected.peers
  running = true
  for (let i = 0; i < pairs; i++) begin(i)
  const { before, after, windowSeconds, cpu } = await measureWindow(
    config.warmupSeconds, config.seconds, () => ({ sessions, acks }),
    on => { if (on) latencies = []; recording = on })
  running = false
  await sleep(200)
  const closedSockets = sockets.filter(peer => peer.closed).length
  await closeAll(sockets)
  return {
    scenario: 'signalfire-sessions', pairs,
    sessionsPerSecond: round((after.sessions - before.sessions) / windowSeconds),
    acksPerSecond: round((after.acks - before.acks) / windowSeconds),
    errors, firstError, unexpected, closedSockets, ...latency(latencies),
    windowSeconds: round(windowSeconds, 3), ...cpu
  }
}

// --- S17-S19: rooms (socket.io) ---
// The clients are the published socket.io-client 4 (imported only for these scenarios), WebSocket
// transport only, one engine.io connection per client (forceNew), no reconnection. `flavor`
// picks the flow: 'polysignal' is wrtc-signal's (docs/protocols/rooms.md): one POST /app for an
// app token, the socket.io connect with it, auth-request -> auth-accept (the session token, sent
// as `auth` with every later event), room-create-request by the room's owner, room-join-request
// answered by the owner's room-join-accept, relay-session-description -> session-description.
// 'reference' is the minimal flow of rooms_reference.py / rooms_reference.mjs: connect (no auth),
// `join` {room} acked, `relay` {room, ...} delivered as `relay` to the room's other members.
let sioIo = null
const loadSocketIo = async () => {
  sioIo = sioIo || (await import('socket.io-client')).io
  return sioIo
}
const httpUrl = url => checkUrl(url).replace(/^ws:/, 'http:')
const isPolysignal = () => config.flavor === 'polysignal'

// The next `event` on a socket.io socket, or an error after `ms`.
const sioNext = (sio, event, ms = 10000) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => { sio.off(event, on); reject(new Error(`no ${event} within ${ms} ms`)) }, ms)
  const on = value => { clearTimeout(timer); resolve(value) }
  sio.once(event, on)
})

// polysignal: one app token for the whole run (an app token never expires).
const roomsAppToken = async url => {
  const body = new URLSearchParams({ app: 'bench', password: config.appPass || '' })
  const res = await fetch(httpUrl(url) + '/app', { method: 'POST', body, signal: AbortSignal.timeout(10000) })
  const answer = await res.json()
  if (res.status !== 200) throw new Error(`POST /app: ${res.status} ${JSON.stringify(answer)}`)
  return answer.response.token
}

// One socket.io client; `closed` is true once the server dropped it. close() / socket.destroy()
// as RawPeer's, for stagedConnect and closeAll.
class SioPeer {
  constructor (url, appToken) {
    const options = { transports: ['websocket'], reconnection: false, forceNew: true, timeout: 10000 }
    if (appToken) options.auth = { token: appToken }
    // socket.io-client offers permessage-deflate (as browsers do) unless told not to: a
    // diagnostic knob, off in every scenario (the client's default is measured).
    if (config.perMessageDeflate === false) options.perMessageDeflate = false
    this.sio = sioIo(httpUrl(url), options)
    this.closed = false
    this.session = null
    this.sio.on('disconnect', reason => { if (reason !== 'io client disconnect') this.closed = true })
    this.socket = { destroy: () => this.sio.disconnect() }
  }

  get id () { return this.sio.id }

  connected () {
    return new Promise((resolve, reject) => {
      if (this.sio.connected) return resolve(this)
      this.sio.once('connect', () => resolve(this))
      this.sio.once('connect_error', error => reject(new Error(`connect_error ${error && error.message}`)))
    })
  }

  // Connect, and on polysignal exchange the app token for a session token.
  async login (appToken) {
    await this.connected()
    if (!isPolysignal()) return this
    const accepted = sioNext(this.sio, 'auth-accept')
    this.sio.emit('auth-request', { token: appToken })
    this.session = (await accepted).token
    return this
  }

  close () {
    this.sio.disconnect()
    return Promise.resolve()
  }
}

// Two logged-in clients in `room`: polysignal: A creates it, B asks to join, A accepts; the
// references: both `join` it.
const roomsPair = async (url, appToken, room) => {
  const a = new SioPeer(url, appToken)
  const b = new SioPeer(url, appToken)
  try {
    await Promise.all([a.login(appToken), b.login(appToken)])
    if (isPolysignal()) {
      const created = sioNext(a.sio, 'room-create-accept')
      a.sio.emit('room-create-request', { auth: a.session, room })
      await created
      const asked = sioNext(a.sio, 'room-join-request')
      const joined = sioNext(b.sio, 'room-join-accept')
      const userJoined = sioNext(a.sio, 'room-user-join')
      b.sio.emit('room-join-request', { auth: b.session, room })
      const request = await asked
      a.sio.emit('room-join-accept', { auth: a.session, room, peer_id: request.peer_id, to: request.peer_id })
      const accept = await joined
      await userJoined
      if (!Array.isArray(accept.peers) || accept.peers[0] !== a.id) throw new Error(`room-join-accept: ${JSON.stringify(accept)}`)
    } else {
      await a.sio.timeout(10000).emitWithAck('join', { room })
      const ack = await b.sio.timeout(10000).emitWithAck('join', { room })
      if (!ack || !Array.isArray(ack.peers) || ack.peers[0] !== a.id) throw new Error(`join ack: ${JSON.stringify(ack)}`)
    }
    return [a, b]
  } catch (error) {
    a.sio.disconnect()
    b.sio.disconnect()
    throw error
  }
}

// `pairs` pairs in rooms `<prefix><k>`, `parallel` pairs at a time; returns the peers as
// [A0..A(pairs-1), B0..B(pairs-1)] (missing ones undefined).
const roomsPairs = async (pairs, parallel, from, prefix, appToken, timeoutMs) => {
  const as = new Array(pairs)
  const bs = new Array(pairs)
  let next = 0
  let failed = 0
  let firstError = null
  const until = Math.min(deadline, now() + timeoutMs)
  const worker = async () => {
    while (next < pairs && now() < until) {
      const k = next++
      try {
        [as[k], bs[k]] = await roomsPair(urls[(from + k) % urls.length], appToken, `${prefix}${from + k}`)
      } catch (error) {
        failed += 2
        firstError = firstError || String(error && error.message)
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(parallel, pairs) }, worker))
  return { as, bs, failed, firstError }
}

// S17: idle clients, two to a room, logged in (polysignal) and in their room, connected in stages.
async function roomsIdle () {
  await loadSocketIo()
  const appToken = isPolysignal() ? await roomsAppToken(urls[0]) : null
  const result = await stagedConnect(config.count, config.stages || 1, async (from, to) => {
    const r = await roomsPairs(Math.floor((to - from) / 2), Math.max(1, (config.parallel || 200) / 2),
      Math.floor(from / 2), 'idle-room', appToken, 120000)
    return { peers: [...r.as, ...r.bs].filter(Boolean), failed: r.failed, firstError: r.firstError }
  })
  return { scenario: 'rooms-idle', flavor: config.flavor, ...result }
}

// S18: churn. `anchors` clients hold a room each (polysignal: its owner, accepting every join
// request at once); `concurrency` loops of: connect (with the app token on polysignal), log in,
// join anchor w's room (polysignal: room-join-request until room-join-accept; the references:
// `join` until its ack), disconnect.
async function roomsChurn () {
  await loadSocketIo()
  const anchorsCount = config.anchors || 100
  const concurrency = config.concurrency
  const maxCycles = config.maxCycles || 1000000
  const appToken = isPolysignal() ? await roomsAppToken(urls[0]) : null
  const anchors = []
  try {
    for (let k = 0; k < anchorsCount; k++) {
      const anchor = new SioPeer(urls[k % urls.length], appToken)
      anchors.push(anchor)
    }
    await Promise.all(anchors.map(async (anchor, k) => {
      await anchor.login(appToken)
      const room = `churn-room${k}`
      if (isPolysignal()) {
        const created = sioNext(anchor.sio, 'room-create-accept')
        anchor.sio.emit('room-create-request', { auth: anchor.session, room })
        await created
        anchor.sio.on('room-join-request', request => {
          anchor.sio.emit('room-join-accept', { auth: anchor.session, room, peer_id: request.peer_id, to: request.peer_id })
        })
      } else {
        await anchor.sio.timeout(10000).emitWithAck('join', { room })
      }
    }))
  } catch (error) {
    for (const anchor of anchors) anchor.sio.disconnect()
    throw new Error(`anchors: ${error && error.message}`)
  }
  let cycles = 0
  let errors = 0
  let firstError = null
  const start = now()
  const stop = Math.min(start + config.seconds * 1000, deadline)
  const mark = cpuMark()
  const cycle = async (w, n) => {
    const room = `churn-room${w % anchorsCount}`
    const peer = new SioPeer(urls[(w + n) % urls.length], appToken)
    try {
      await Promise.race([
        (async () => {
          await peer.login(appToken)
          if (isPolysignal()) {
            const accepted = sioNext(peer.sio, 'room-join-accept', 5000)
            peer.sio.emit('room-join-request', { auth: peer.session, room })
            await accepted
          } else {
            await peer.sio.timeout(5000).emitWithAck('join', { room })
          }
        })(),
        sleep(5000).then(() => { throw new Error('cycle timed out') })
      ])
      return null
    } catch (error) {
      return String(error && error.message)
    } finally {
      peer.sio.disconnect()
    }
  }
  const worker = async w => {
    for (let n = 0; now() < stop && cycles + errors < maxCycles; n++) {
      const error = await cycle(w, n)
      if (error === null) cycles++
      else { errors++; firstError = firstError || error }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)))
  const wall = (now() - start) / 1000
  const cpu = cpuSince(mark)
  for (const anchor of anchors) anchor.sio.disconnect()
  return {
    scenario: 'rooms-churn', flavor: config.flavor, concurrency, anchors: anchorsCount, cycles,
    errors, firstError, cyclesPerSecond: round(cycles / wall), ...cpu
  }
}

// S19: relay. `pairs` pairs in rooms (as S17's); each A relays a session description (an offer
// with an SDP of sdpBytes) to its B, at most `window` not yet received by B (a closed loop: B's
// receipt sends A's next). A pair's relays keep their order through the server, so the latency
// is read from a ring of A's send times; the first relay of each pair is checked in full (sender,
// room, SDP), the others by their SDP's length.
async function roomsRelay () {
  await loadSocketIo()
  const pairs = config.pairs
  const window = config.window
  const latencyEvery = config.latencyEvery || 1
  let budget = config.maxRelays || 50000000
  if (!(window >= 1)) throw new Error('window must be at least 1')
  const appToken = isPolysignal() ? await roomsAppToken(urls[0]) : null
  const setup = await roomsPairs(pairs, 50, 0, 'relay-room', appToken, 60000)
  if (setup.failed) {
    for (const peer of [...setup.as, ...setup.bs]) if (peer) peer.sio.disconnect()
    throw new Error(`${setup.failed} of ${2 * pairs} clients failed: ${setup.firstError}`)
  }
  const { as, bs } = setup
  const sdpHead = 'v=0\r\no=- 0 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n'
  const sdpBytes = config.sdpBytes || 200
  const sdp = sdpHead + 'a=x'.repeat(sdpBytes).slice(0, Math.max(0, sdpBytes - sdpHead.length))
  const description = { type: 'offer', sdp }
  const sentAt = Array.from({ length: pairs }, () => new Float64Array(window))
  const sent = new Float64Array(pairs)
  const received = new Float64Array(pairs)
  const checked = new Uint8Array(pairs)
  let running = false
  let recording = false
  let relays = 0
  let errors = 0
  let firstError = null
  let badFrames = 0
  let firstBad = null
  let latencies = []
  const send = isPolysignal()
    ? i => as[i].sio.emit('relay-session-description',
      { auth: as[i].session, to: bs[i].id, room: `relay-room${i}`, session_description: description })
    : i => as[i].sio.emit('relay', { room: `relay-room${i}`, to: bs[i].id, session_description: description })
  const pump = i => {
    while (running && budget > 0 && sent[i] - received[i] < window) {
      budget--
      sentAt[i][sent[i] % window] = now()
      sent[i]++
      send(i)
    }
  }
  const onRelay = i => message => {
    const at = now()
    const n = received[i]++
    relays++
    if (recording && n % latencyEvery === 0) latencies.push(at - sentAt[i][n % window])
    const got = message && message.session_description
    if (!checked[i]) {
      checked[i] = 1
      const ok = got && got.sdp === sdp && got.type === 'offer' && message.room === `relay-room${i}` &&
        (!isPolysignal() || message.peer_id === as[i].id)
      if (!ok) { badFrames++; firstBad = firstBad || JSON.stringify(message).slice(0, 200) }
    } else if (!got || typeof got.sdp !== 'string' || got.sdp.length !== sdp.length) {
      badFrames++
      firstBad = firstBad || JSON.stringify(message).slice(0, 200)
    }
    pump(i)
  }
  const onError = message => { errors++; firstError = firstError || JSON.stringify(message).slice(0, 200) }
  for (let i = 0; i < pairs; i++) {
    bs[i].sio.on(isPolysignal() ? 'session-description' : 'relay', onRelay(i))
    for (const peer of [as[i], bs[i]]) {
      for (const event of ['error', 'unauthorized', 'relay-error']) peer.sio.on(event, onError)
    }
  }
  running = true
  for (let i = 0; i < pairs; i++) pump(i)
  const { before, after, windowSeconds, cpu } = await measureWindow(
    config.warmupSeconds, config.seconds, () => ({ relays }),
    on => { if (on) latencies = []; recording = on })
  running = false
  const owed = () => { let n = 0; for (let i = 0; i < pairs; i++) n += sent[i] - received[i]; return n }
  await drain(() => owed() === 0, () => relays, 1000, 5000)
  const closedSockets = [...as, ...bs].filter(peer => peer.closed).length
  for (const peer of [...as, ...bs]) peer.sio.disconnect()
  return {
    scenario: 'rooms-relay', flavor: config.flavor, pairs, window, sdpBytes: sdp.length,
    relaysPerSecond: round((after.relays - before.relays) / windowSeconds),
    errors, firstError, badFrames, firstBad, lost: owed(), closedSockets, ...latency(latencies),
    windowSeconds: round(windowSeconds, 3), ...cpu
  }
}

const scenarios = {
  fanout,
  idle,
  churn,
  pipes,
  signalfire,
  'peerjs-idle': peerjsIdle,
  'peerjs-relay': peerjsRelay,
  'peerjs-churn': peerjsChurn,
  'relay-idle': relayIdle,
  'relay-churn': relayChurn,
  'signalfire-idle': signalfireIdle,
  'signalfire-sessions': signalfireSessions,
  'rooms-idle': roomsIdle,
  'rooms-churn': roomsChurn,
  'rooms-relay': roomsRelay
}
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
