// The second reference for the rooms scenarios (S17-S19): the same room relay as
// rooms_reference.py, on Node's socket.io 4 (npm `socket.io` 4.8.1, its in-memory adapter,
// defaults otherwise), on 127.0.0.1 only.
//   connect: accepted, no auth checked
//   join {room}: the socket enters room; the ack is {room, peers} (the other members)
//   relay {room, ...}: if the sender is in room, the data goes unchanged, as event `relay`, to
//     the room's other members (else relay-error to the sender)
// Leaving is disconnecting. GET /healthz answers 200.
//   PORT=8080 node rooms_reference.mjs
import { createServer } from 'node:http'
import { Server } from 'socket.io'

const port = Number(process.env.PORT) || 8080
const http = createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok')
  } else {
    res.writeHead(404).end()
  }
})
const io = new Server(http, { cors: { origin: '*' } })

io.on('connection', socket => {
  socket.on('join', (data, ack) => {
    const room = data && data.room
    const answer = typeof ack === 'function' ? ack : () => {}
    if (typeof room !== 'string' || room === '') return answer({ error: 'room is required' })
    socket.join(room)
    const members = io.sockets.adapter.rooms.get(room) || new Set()
    answer({ room, peers: [...members].filter(id => id !== socket.id) })
  })
  socket.on('relay', data => {
    const room = data && data.room
    if (typeof room !== 'string' || !socket.rooms.has(room)) {
      socket.emit('relay-error', { message: 'not in this room' })
      return
    }
    socket.to(room).emit('relay', data)
  })
})

http.listen(port, '127.0.0.1', () => {
  console.log(`socket.io rooms reference listening on 127.0.0.1:${port}`)
})
