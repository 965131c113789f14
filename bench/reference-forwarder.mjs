/**
 * The bench's yardstick for forwarding: the least a Node process can do to pass an HTTP request
 * on to another server and its answer back (node:http, kept-alive connections, streams piped).
 * What a Berth node adds on top of this is Berth's own cost; what this adds is the machine's.
 *
 * Usage: node bench/reference-forwarder.mjs <target base URL> — prints the port it listens on.
 */
import http from 'node:http';

const target = new URL(process.argv[2]);
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

const server = http.createServer((request, response) => {
  const upstream = http.request(
    {
      host: target.hostname,
      port: target.port,
      path: request.url,
      method: request.method,
      headers: request.headers,
      agent,
    },
    (answer) => {
      response.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(response);
    },
  );
  upstream.on('error', () => response.destroy());
  request.pipe(upstream);
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
