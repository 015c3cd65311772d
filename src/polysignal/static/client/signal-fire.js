// Browser client for polysignal's Signal-Fire protocol (docs/protocols/signal-fire.md).
// An ES module with no build step, served by polysignal at /client/signal-fire.js:
//
//   import { connect } from '/client/signal-fire.js'
//   const client = await connect('ws://host:4444/signal-fire')
//   const session = await client.createSession(otherId)
//   session.addEventListener('accepted', ev => ev.detail.createDataChannel('chat'))
//   client.addEventListener('session', async ev => {
//     const pc = await ev.detail.accept()   // or ev.detail.reject('busy')
//   })
//
// The RTCPeerConnection is created with the welcome's ICE configuration (merged over the one
// given to connect). Negotiation follows the "perfect negotiation" pattern, so either side may
// add tracks or channels at any time: the accepting side is the polite peer. Offers are sent as
// data.offer, answers as data.answer, candidates as data.candidate (docs/protocols/signal-fire.md).

const SUBPROTOCOL = 'Signal-Fire@3'
const ALPHABET = 'useandom-26T198340PX75pxJACKVERYMINDBUSHWOLF_GQZbfghjklqvwyzrict'
const REQUEST_TIMEOUT_MS = 10000

function newId () {
  const bytes = crypto.getRandomValues(new Uint8Array(21))
  let id = ''
  for (const b of bytes) id += ALPHABET[b & 63]
  return id
}

export class SignalFireError extends Error {}

// Connect and resolve once the server's welcome has arrived. Browsers cannot offer the
// subprotocol (it contains '@'), so the URL should be polysignal's Signal-Fire path; pass
// { subprotocol: 'Signal-Fire@3' } only for a server that insists on it and a runtime that allows it.
export function connect (url, rtcConfig = {}, { subprotocol = null } = {}) {
  return new Promise((resolve, reject) => {
    const socket = subprotocol ? new WebSocket(url, subprotocol) : new WebSocket(url)
    let done = false
    const fail = (message, code) => {
      if (done) return
      done = true
      if (code) socket.close(code, message)
      reject(new SignalFireError(message))
    }
    socket.addEventListener('error', () => fail('connection failed'))
    socket.addEventListener('close', () => fail('connection closed before welcome'))
    socket.addEventListener('open', () => {
      if (subprotocol && socket.protocol !== subprotocol) fail('subprotocol not accepted', 1002)
    })
    socket.addEventListener('message', function onWelcome (ev) {
      socket.removeEventListener('message', onWelcome)
      let message
      try { message = JSON.parse(ev.data) } catch { return fail('welcome is not JSON', 1003) }
      if (message?.cmd !== 'welcome' || typeof message.data?.id !== 'string') {
        return fail('expected welcome', 1008)
      }
      done = true
      const configuration = { ...rtcConfig, ...(message.data.configuration || {}) }
      resolve(new Client(socket, message.data.id, configuration))
    })
  })
}

class Session extends EventTarget {
  constructor (client, peer) {
    super()
    this.client = client
    this.peer = peer
    this.state = 'pending'
  }

  _end (state, detail) {
    if (this.state !== 'pending') return false
    this.state = state
    this.dispatchEvent(new CustomEvent(state, { detail }))
    return true
  }
}

// A session this client started. Events: accepted (detail: RTCPeerConnection), rejected
// (detail: the reason string or null), cancelled, timed-out.
export class OutgoingSession extends Session {
  get target () { return this.peer }

  async cancel () {
    await this.client.request('session-cancel', this.peer)
    this._end('cancelled')
  }
}

// A session another client started. Events: cancelled, timed-out.
export class IncomingSession extends Session {
  get origin () { return this.peer }

  // Accept: the RTCPeerConnection exists before the server relays the acceptance, so the
  // other side's offer always finds it. Resolves to that connection.
  async accept () {
    const pc = this.client._link(this.peer, true).pc
    try {
      await this.client.request('session-accept', this.peer)
    } catch (err) {
      this.client._unlink(this.peer)
      throw err
    }
    this._end('accepted', pc)
    return pc
  }

  async reject (reason) {
    const data = reason === undefined ? undefined : { message: String(reason) }
    await this.client.request('session-reject', this.peer, data)
    this._end('rejected', reason ?? null)
  }
}

// One RTCPeerConnection with a peer, negotiated through the server.
class Link {
  constructor (client, peer, polite) {
    this.client = client
    this.peer = peer
    this.polite = polite
    this.makingOffer = false
    this.ignoreOffer = false
    this.pendingCandidates = []
    this.pc = new RTCPeerConnection(client.configuration)
    this.pc.addEventListener('negotiationneeded', () => this._offer())
    this.pc.addEventListener('icecandidate', ({ candidate }) => {
      if (candidate) this._send('ice', { candidate: candidate.toJSON() })
    })
  }

  _send (cmd, data) {
    this.client.request(cmd, this.peer, data).catch(err => this.client._error(err))
  }

  async _offer () {
    try {
      this.makingOffer = true
      await this.pc.setLocalDescription()
      this._send('offer', { offer: this.pc.localDescription.toJSON() })
    } catch (err) {
      this.client._error(err)
    } finally {
      this.makingOffer = false
    }
  }

  async onSignal (cmd, data) {
    const pc = this.pc
    if (cmd === 'ice') {
      if (!data?.candidate) return
      if (!pc.remoteDescription) {
        this.pendingCandidates.push(data.candidate)
        return
      }
      try {
        await pc.addIceCandidate(data.candidate)
      } catch (err) {
        if (!this.ignoreOffer) this.client._error(err)
      }
      return
    }
    // Answers are read from data.answer (the published 1.4.0 client read data.offer).
    const description = cmd === 'offer' ? data?.offer : data?.answer
    if (!description) return
    const collision = description.type === 'offer' &&
      (this.makingOffer || pc.signalingState !== 'stable')
    this.ignoreOffer = !this.polite && collision
    if (this.ignoreOffer) return
    await pc.setRemoteDescription(description)
    for (const candidate of this.pendingCandidates.splice(0)) {
      await pc.addIceCandidate(candidate).catch(err => this.client._error(err))
    }
    if (description.type === 'offer') {
      await pc.setLocalDescription()
      this._send('answer', { answer: pc.localDescription.toJSON() })
    }
  }
}

// A connected client. Events: session (detail: IncomingSession), error (detail: Error),
// close. `id` is the server-assigned id, `configuration` the RTCConfiguration in use.
export class Client extends EventTarget {
  constructor (socket, id, configuration) {
    super()
    this.socket = socket
    this.id = id
    this.configuration = configuration
    this.links = new Map() // peer id -> Link
    this.outgoing = new Map() // peer id -> OutgoingSession
    this.incoming = new Map() // peer id -> IncomingSession
    this.acks = new Map() // request id -> { resolve, reject, timer }
    this.signalChains = new Map() // peer id -> Promise: signals of one peer applied in order
    socket.addEventListener('message', ev => this._onMessage(ev.data))
    socket.addEventListener('close', () => {
      for (const { reject, timer } of this.acks.values()) {
        clearTimeout(timer)
        reject(new SignalFireError('connection closed'))
      }
      this.acks.clear()
      this.dispatchEvent(new Event('close'))
    })
  }

  // Send one request; resolves on {ok:true}, rejects with the server's message on ok:false.
  request (cmd, target, data) {
    return new Promise((resolve, reject) => {
      if (this.socket.readyState !== WebSocket.OPEN) {
        return reject(new SignalFireError('connection closed'))
      }
      const id = newId()
      const timer = setTimeout(() => {
        this.acks.delete(id)
        reject(new SignalFireError(`no reply to ${cmd}`))
      }, REQUEST_TIMEOUT_MS)
      this.acks.set(id, { resolve, reject, timer })
      const message = { id, cmd, target }
      if (data !== undefined) message.data = data
      this.socket.send(JSON.stringify(message))
    })
  }

  // Ask `target` for a session; rejects with the server's error (e.g. "Peer Not Found").
  async createSession (target) {
    if (target === this.id) throw new SignalFireError("Can't Send to Yourself")
    if (this.outgoing.has(target)) throw new SignalFireError('session already pending')
    const session = new OutgoingSession(this, target)
    this.outgoing.set(target, session)
    try {
      await this.request('session-start', target)
    } catch (err) {
      this.outgoing.delete(target)
      throw err
    }
    return session
  }

  close () {
    for (const link of this.links.values()) link.pc.close()
    this.links.clear()
    this.socket.close(1000)
  }

  _link (peer, polite) {
    let link = this.links.get(peer)
    if (!link) {
      link = new Link(this, peer, polite)
      this.links.set(peer, link)
    }
    return link
  }

  _unlink (peer) {
    this.links.get(peer)?.pc.close()
    this.links.delete(peer)
    this.signalChains.delete(peer)
  }

  _error (err) {
    this.dispatchEvent(new CustomEvent('error', { detail: err }))
  }

  _onMessage (raw) {
    let message
    try { message = JSON.parse(raw) } catch { return }
    if (!message || typeof message !== 'object') return
    if ('ok' in message) {
      const pending = this.acks.get(message.id)
      if (!pending) {
        // A second reply after the ack: the relay could not be delivered.
        if (message.ok === false) this._error(new SignalFireError(message.data?.message))
        return
      }
      this.acks.delete(message.id)
      clearTimeout(pending.timer)
      if (message.ok === true) pending.resolve()
      else pending.reject(new SignalFireError(message.data?.message || 'request failed'))
      return
    }
    const origin = message.origin
    if (typeof origin !== 'string') return
    switch (message.cmd) {
      case 'session-start': {
        const session = new IncomingSession(this, origin)
        this.incoming.set(origin, session)
        session.addEventListener('rejected', () => this.incoming.delete(origin))
        this.dispatchEvent(new CustomEvent('session', { detail: session }))
        break
      }
      case 'session-accept': {
        const session = this.outgoing.get(origin)
        if (!session) return
        this.outgoing.delete(origin)
        session._end('accepted', this._link(origin, false).pc)
        break
      }
      case 'session-reject':
        this.outgoing.get(origin)?._end('rejected', message.data?.message ?? null)
        this.outgoing.delete(origin)
        break
      case 'session-cancel':
        this.incoming.get(origin)?._end('cancelled')
        this.incoming.delete(origin)
        break
      case 'session-timeout':
        this.outgoing.get(origin)?._end('timed-out')
        this.outgoing.delete(origin)
        this.incoming.get(origin)?._end('timed-out')
        this.incoming.delete(origin)
        break
      case 'offer':
      case 'answer':
      case 'ice': {
        // Only peers with an accepted session may negotiate; anything else is ignored.
        const link = this.links.get(origin)
        if (!link) return
        const previous = this.signalChains.get(origin) || Promise.resolve()
        const next = previous
          .then(() => link.onSignal(message.cmd, message.data))
          .catch(err => this._error(err))
        this.signalChains.set(origin, next)
        break
      }
    }
  }
}

export default connect
