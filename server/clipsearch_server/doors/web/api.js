// clipsearch page: the Connect JSON calls and thumbnail URLs, with the session's token.

const API = "/clipsearch.v1.ClipSearchService/";
export const TOKEN_KEY = "clipsearch.token";

export class ApiError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

export async function rpc(method, body) {
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let reply;
  try {
    reply = await fetch(API + method, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (err) {
    throw new ApiError("unavailable", "cannot reach the server");
  }
  const text = await reply.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (err) { data = { message: text }; }
  if (!reply.ok) throw new ApiError(data.code || "unknown", data.message || reply.statusText);
  return data;
}

// A URL for an item's thumbnail: the endpoint itself, or with a token (which an <img> cannot
// send) a blob fetched with it, recorded in `blobs` so that it can be revoked.
export async function thumbnailUrl(collection, id, blobs) {
  const url = `/thumbnail?collection=${encodeURIComponent(collection)}` +
              `&id=${encodeURIComponent(id)}`;
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return url; // the browser caches it by its ETag
  const reply = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
  if (!reply.ok) return null;
  const blob = URL.createObjectURL(await reply.blob());
  blobs.push(blob);
  return blob;
}
