// polysignal rooms demo: a WebRTC call between two tabs, signalled through the rooms protocol
// (socket.io events of wrtc-signal, docs/protocols/rooms.md). The joiner offers to every member
// named in `room-join-accept`; members answer the offers they get after `room-user-join`.
'use strict'

;(function () {
  const $ = (id) => document.getElementById(id)
  const params = new URLSearchParams(location.hash.slice(1))

  // What the page exposes for people poking at it in the console (and for the browser test).
  const demo = {
    session: null, // session token from auth-accept
    room: null,
    peers: new Map(), // peer id -> { pc, channel, pendingIce: [] }
    received: [], // chat messages received over data channels
    iceConfig: { iceServers: [] },
    openChannels () {
      return [...demo.peers.values()].filter((p) => p.channel && p.channel.readyState === 'open').length
    }
  }
  window.demo = demo
  let socket = null
  let localStream = null

  function log (text, cls) {
    const item = document.createElement('li')
    item.textContent = `${new Date().toLocaleTimeString()} ${text}`
    if (cls) item.className = cls
    $('log').prepend(item)
  }

  function status (text) {
    $('status').textContent = text
  }

  function emit (event, data) {
    socket.emit(event, { auth: demo.session, ...data })
  }

  async function loadIceConfig () {
    try {
      const res = await fetch('/demo/config.json')
      demo.iceConfig = await res.json()
    } catch (err) {
      log(`no ICE configuration (${err}); host candidates only`, 'error')
    }
  }

  async function getToken () {
    const body = new URLSearchParams({ app: $('app-name').value, password: $('app-pass').value })
    const res = await fetch('/app', { method: 'POST', body })
    const answer = await res.json()
    if (answer.error) return log(`POST /app: ${answer.error}`, 'error')
    $('token').value = answer.response.token
    log('got an app token')
  }

  async function connect () {
    const token = $('token').value.trim()
    if (!token) return log('an app token is needed first', 'error')
    if ($('media').checked && navigator.mediaDevices) {
      try {
        localStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true })
        addVideo('local', localStream, true)
      } catch (err) {
        log(`camera/microphone unavailable (${err.name}); data channel only`)
      }
    }
    if (socket) socket.disconnect()
    // The local socket.io-client bundle; websocket only, as the original demo.
    socket = io({ transports: ['websocket'], auth: { token } })
    socket.on('connect', () => {
      status('connected, authenticating')
      const name = $('name').value || `peer-${socket.id.slice(0, 4)}`
      socket.emit('auth-request', { token, payload: { demo: true }, peerinfo: { name } })
    })
    socket.on('connect_error', (err) => {
      status('refused')
      log(`connect_error: ${err.message}`, 'error')
    })
    socket.on('disconnect', (reason) => {
      status(`disconnected (${reason})`)
      $('create').disabled = $('join').disabled = true
    })
    socket.on('auth-accept', (data) => {
      demo.session = data.token
      status(`signed in as ${socket.id}`)
      $('create').disabled = $('join').disabled = false
    })
    socket.on('auth-reject', (data) => log(`auth-reject: ${data.message}`, 'error'))
    socket.on('unauthorized', (data) => log(`unauthorized: ${data.message}`, 'error'))
    socket.on('error', (data) => log(`error: ${data.message}`, 'error'))
    socket.on('room-create-accept', (data) => {
      demo.room = data.room
      $('room').value = data.room
      status(`owner of room ${data.room}`)
      log(`created room ${data.room}`)
    })
    socket.on('room-create-reject', (data) => log(`room-create-reject: ${data.message}`, 'error'))
    socket.on('room-join-request', onJoinRequest)
    socket.on('room-join-accept', onJoinAccept)
    socket.on('room-join-reject', (data) => log(`room-join-reject: ${data.message}`, 'error'))
    socket.on('room-user-join', (data) => {
      log(`${who(data)} joined ${data.room}`)
      peerFor(data.peer_id, false)
    })
    socket.on('room-user-leave', (data) => {
      log(`${who(data)} left ${data.room}`)
      dropPeer(data.peer_id)
    })
    socket.on('session-description', onSessionDescription)
    socket.on('ice-candidate', onIceCandidate)
  }

  function who (data) {
    const info = data.peerinfo
    return (info && info.name) || data.peer_id
  }

  function onJoinRequest (data) {
    const ok = $('auto-accept').checked || window.confirm(`${who(data)} asks to join ${data.room}. Accept?`)
    const answer = { room: data.room, peer_id: data.peer_id, to: data.peer_id }
    emit(ok ? 'room-join-accept' : 'room-join-reject', answer)
    log(`${ok ? 'accepted' : 'rejected'} ${who(data)}`)
  }

  async function onJoinAccept (data) {
    demo.room = data.room
    status(`in room ${data.room}`)
    log(`joined ${data.room}; peers: ${data.peers.length}`)
    for (const id of data.peers) {
      const peer = peerFor(id, true)
      await peer.pc.setLocalDescription(await peer.pc.createOffer())
      emit('relay-session-description', {
        to: id, peer_id: id, room: data.room, session_description: peer.pc.localDescription
      })
    }
  }

  function peerFor (id, initiator) {
    let peer = demo.peers.get(id)
    if (peer) return peer
    const pc = new RTCPeerConnection(demo.iceConfig)
    peer = { pc, channel: null, pendingIce: [] }
    demo.peers.set(id, peer)
    if (localStream) localStream.getTracks().forEach((t) => pc.addTrack(t, localStream))
    pc.onicecandidate = (event) => {
      if (!event.candidate) return
      emit('relay-ice-candidate', {
        to: id, peer_id: id, room: demo.room, ice_candidate: event.candidate.toJSON()
      })
    }
    pc.ontrack = (event) => addVideo(id, event.streams[0], false)
    pc.onconnectionstatechange = () => log(`${id}: ${pc.connectionState}`)
    if (initiator) {
      attachChannel(peer, id, pc.createDataChannel('chat'))
    } else {
      pc.ondatachannel = (event) => attachChannel(peer, id, event.channel)
    }
    return peer
  }

  function attachChannel (peer, id, channel) {
    peer.channel = channel
    channel.onopen = () => {
      log(`data channel to ${id} open`)
      status(`connected to ${demo.openChannels()} peer(s) in ${demo.room}`)
      $('chat').disabled = $('send').disabled = false
    }
    channel.onmessage = (event) => {
      demo.received.push({ from: id, text: String(event.data) })
      log(`${id}: ${event.data}`, 'chat')
    }
  }

  function dropPeer (id) {
    const peer = demo.peers.get(id)
    if (!peer) return
    peer.pc.close()
    demo.peers.delete(id)
    const video = document.getElementById(`video-${id}`)
    if (video) video.remove()
  }

  async function onSessionDescription (data) {
    const description = data.session_description
    const peer = peerFor(data.peer_id, false)
    await peer.pc.setRemoteDescription(description)
    for (const candidate of peer.pendingIce.splice(0)) await peer.pc.addIceCandidate(candidate)
    if (description.type === 'offer') {
      await peer.pc.setLocalDescription(await peer.pc.createAnswer())
      emit('relay-session-description', {
        to: data.peer_id, peer_id: data.peer_id, room: data.room, session_description: peer.pc.localDescription
      })
    }
  }

  async function onIceCandidate (data) {
    const peer = peerFor(data.peer_id, false)
    if (!peer.pc.remoteDescription) {
      peer.pendingIce.push(data.ice_candidate) // trickled before the description arrived
      return
    }
    try {
      await peer.pc.addIceCandidate(data.ice_candidate)
    } catch (err) {
      log(`bad ICE candidate from ${data.peer_id}: ${err}`, 'error')
    }
  }

  function addVideo (id, stream, muted) {
    let video = document.getElementById(`video-${id}`)
    if (!video) {
      video = document.createElement('video')
      video.id = `video-${id}`
      video.autoplay = true
      video.playsInline = true
      video.muted = muted
      $('videos').append(video)
    }
    video.srcObject = stream
  }

  function sendChat (event) {
    event.preventDefault()
    const text = $('chat').value
    if (!text) return
    for (const peer of demo.peers.values()) {
      if (peer.channel && peer.channel.readyState === 'open') peer.channel.send(text)
    }
    log(`me: ${text}`, 'chat')
    $('chat').value = ''
  }

  $('get-token').onclick = getToken
  $('connect').onclick = connect
  $('create').onclick = () => emit('room-create-request', { room: $('room').value.trim() })
  $('join').onclick = () => emit('room-join-request', { room: $('room').value.trim() })
  $('chat-form').onsubmit = sendChat
  if (params.get('token')) $('token').value = params.get('token')
  if (params.get('room')) $('room').value = params.get('room')
  demo.ready = loadIceConfig()
})()
