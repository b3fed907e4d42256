// Check that a request came from jobd (Standard Webhooks signatures), with node's own
// crypto: no package. Copy it into your app; README "Handlers behind a URL" shows the
// same function in TypeScript, and a node:http server and a Next.js route using it.
//
//   webhook-signature: v1,<base64(HMAC-SHA256(key, `${id}.${timestamp}.${rawBody}`))>
//
// Verify the raw body bytes before parsing them; refuse timestamps more than five
// minutes from your clock.
import { createHmac, timingSafeEqual } from "node:crypto";

export const TOLERANCE_S = 300;

export class InvalidSignature extends Error {}

// headers: a plain object with lower-case names (node:http's req.headers) or a
// Headers instance (fetch, Next.js); body: the raw request body (Buffer or string).
export function verify(secret, headers, body, nowS = Date.now() / 1000) {
  const get = (name) => (typeof headers.get === "function" ? headers.get(name) : headers[name]);
  const id = get("webhook-id");
  const timestamp = get("webhook-timestamp");
  const signatures = get("webhook-signature");
  if (!id || !timestamp || !signatures || !/^\d+$/.test(timestamp)) {
    throw new InvalidSignature("missing or malformed webhook headers");
  }
  if (Math.abs(nowS - Number(timestamp)) > TOLERANCE_S) {
    throw new InvalidSignature("webhook-timestamp is more than 5 minutes from now");
  }
  const key = secret.startsWith("whsec_")
    ? Buffer.from(secret.slice("whsec_".length), "base64")
    : Buffer.from(secret, "utf8");
  const mac = createHmac("sha256", key)
    .update(`${id}.${timestamp}.`)
    .update(typeof body === "string" ? Buffer.from(body, "utf8") : body)
    .digest("base64");
  const expected = Buffer.from(`v1,${mac}`);
  for (const candidate of signatures.split(" ")) {
    const given = Buffer.from(candidate);
    if (given.length === expected.length && timingSafeEqual(given, expected)) {
      return;
    }
  }
  throw new InvalidSignature("no signature matches the body");
}
