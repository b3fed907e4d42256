// A jobd HTTP handler on plain node:http, verifying each request with verify.mjs.
// `node server.mjs <port> <secret>`; it prints "listening <port>" once ready, answers
// 200 {"verified": true, "job": <id>} to a signed request and 401 to any other.
// (The tests run it against a real jobd: tests/e2e/test_http_handlers_e2e.py.)
import { createServer } from "node:http";
import { verify, InvalidSignature } from "./verify.mjs";

const [port, secret] = process.argv.slice(2);

createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    try {
      verify(secret, req.headers, body);
    } catch (err) {
      if (!(err instanceof InvalidSignature)) throw err;
      res.writeHead(401, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: err.message }));
      return;
    }
    const job = JSON.parse(body.toString("utf8"));
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ verified: true, job: job.id, args: job.args }));
  });
}).listen(Number(port), "127.0.0.1", function () {
  console.log(`listening ${this.address().port}`);
});
