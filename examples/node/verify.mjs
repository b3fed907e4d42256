// Check that a request came from jobd (Standard Webhooks signatures), with node's own
// crypto: no package. Copy it into your app (a TypeScript project imports it as it is:
// the JSDoc below types it); server.mjs beside it is a node:http handler using it.
//
//   webhook-signature: v1,<base64(HMAC-SHA256(key, `${id}.${timestamp}.${rawBody}`))>
//
// Verify the raw body bytes before parsing them; refuse timestamps more than five
// minutes from your clock.
import { createHmac, timingSafeEqual } from "node:crypto";

export const TOLERANCE_S = 300;

export class InvalidSignature extends Error {}

/**
 * Throws InvalidSignature unless the headers sign the raw body with the secret.
 * (The JSDoc types are what a TypeScript project importing this file sees.)
 * @param {string} secret the kind's secret, as in its secret_file
 * @param {Record<string, string | string[] | undefined> | Headers} headers node:http's
 *   req.headers (lower-case names), or a fetch/Next.js Headers
 * @param {Buffer | string} body the raw request body, before any JSON parsing
 * @param {number} [nowS] the time to check the timestamp against, Unix seconds
 * @returns {void}
 */
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
