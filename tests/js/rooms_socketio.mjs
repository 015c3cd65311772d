// The published socket.io-client 4.x against polysignal's rooms protocol: an app token from
// POST /app, auth-request, room-create, join request/accept, both relays, leave.
// Usage: node rooms_socketio.mjs <owner base url> <joiner base url> <APP_PASS> [websocket]
// (two urls: owner and joiner on two nodes; "websocket": the joiner too skips long-polling,
// for servers without sticky sessions). Prints one JSON object as its last line.
import { io } from 'socket.io-client'

const [ownerUrl, joinerUrl, password, joinerTransport] = process.argv.slice(2)
const room = `room-${process.pid}`
const sockets = []
const deadline = setTimeout(() => finish({ ok: false, error: 'timed out' }), 20000)

function finish (result) {
  clearTimeout(deadline)
  for (const socket of sockets) socket.disconnect()
  console.log(JSON.stringify(result))
  process.exit(0)
}

function next (socket, event) {
  return new Promise((resolve) => socket.once(event, resolve))
}

async function appToken (url) {
  const body = new URLSearchParams({ app: 'interop', password })
  const res = await fetch(`${url}/app`, { method: 'POST', body })
  const answer = await res.json()
  if (res.status !== 200) throw new Error(`POST /app: ${res.status} ${JSON.stringify(answer)}`)
  return answer.response.token
}

async function connect (url, token, name, options) {
  const socket = io(url, { auth: { token }, reconnection: false, ...options })
  sockets.push(socket)
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve)
    socket.once('connect_error', (err) => reject(new Error(`${name}: connect_error ${err.message}`)))
  })
  const accepted = next(socket, 'auth-accept')
  socket.emit('auth-request', { token, payload: { foo: 'bar' }, peerinfo: { name } })
  socket.session = (await accepted).token
  return socket
}

try {
  // A bad token first: the client must get connect_error with a reason, not hang.
  const refused = io(ownerUrl, { auth: { token: 'forged' }, reconnection: false, transports: ['websocket'] })
  sockets.push(refused)
  const refusal = await next(refused, 'connect_error')

  const token = await appToken(ownerUrl)
  // The owner uses the demo's websocket-only transport; the joiner the default (polling, then
  // upgrade), so both engine.io transports are exercised.
  const owner = await connect(ownerUrl, token, 'owner', { transports: ['websocket'] })
  const joiner = await connect(joinerUrl, token, 'joiner', joinerTransport === 'websocket' ? { transports: ['websocket'] } : {})

  const created = next(owner, 'room-create-accept')
  owner.emit('room-create-request', { auth: owner.session, room })
  const createAccept = await created

  const asked = next(owner, 'room-join-request')
  joiner.emit('room-join-request', { auth: joiner.session, room, payload: { hello: 1 } })
  const joinRequest = await asked

  const accepted = next(joiner, 'room-join-accept')
  const userJoined = next(owner, 'room-user-join')
  owner.emit('room-join-accept', { auth: owner.session, room, peer_id: joinRequest.peer_id, to: joinRequest.peer_id })
  const joinAccept = await accepted
  const userJoin = await userJoined

  const description = next(owner, 'session-description')
  joiner.emit('relay-session-description', {
    auth: joiner.session, to: owner.id, peer_id: owner.id, room, session_description: { type: 'offer', sdp: 'v=0\r\n' }
  })
  const sessionDescription = await description

  const candidate = next(joiner, 'ice-candidate')
  owner.emit('relay-ice-candidate', {
    auth: owner.session, to: joiner.id, peer_id: joiner.id, room, ice_candidate: { sdpMLineIndex: 0, candidate: 'candidate:1 1 udp 1 127.0.0.1 9 typ host' }
  })
  const iceCandidate = await candidate

  const unauthorized = next(owner, 'unauthorized')
  owner.emit('relay-ice-candidate', { auth: joiner.session, to: joiner.id, room, ice_candidate: {} })
  const unauthorizedBody = await unauthorized

  const left = next(owner, 'room-user-leave')
  const joinerId = joiner.id
  joiner.disconnect()
  const userLeave = await left

  finish({
    ok: true,
    room,
    ownerId: owner.id,
    joinerId,
    refusal: { message: refusal.message },
    createAccept,
    joinRequest,
    joinAccept,
    userJoin,
    sessionDescription,
    iceCandidate,
    unauthorized: unauthorizedBody,
    userLeave
  })
} catch (error) {
  finish({ ok: false, error: String(error) })
}
