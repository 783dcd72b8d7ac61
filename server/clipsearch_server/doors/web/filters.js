// clipsearch page: the metadata filter rows, and the proto Filter (JSON) they make.
// Values reach the page only as input values and textContent.

const OPS = [["equals", "="], ["range", "number between"], ["time", "time between"],
             ["exists", "exists"]];
const KEYS = "filter-keys"; // the <datalist> of metadata keys the key fields suggest
const MAX_KEYS = 200;
const KEY_DEPTH = 3;        // exif.gps.lat, but no deeper

// Adds one row (key, condition, value or bounds, remove) to `container`.
export function addFilterRow(container) {
  const row = document.createElement("div");
  row.className = "filter-row";
  const key = input("text", "key", "Metadata key, e.g. album or exif.camera");
  key.setAttribute("list", KEYS);
  const op = document.createElement("select");
  op.setAttribute("aria-label", "Condition");
  for (const [value, label] of OPS) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    op.append(o);
  }
  const a = input("text", "value", "Value");
  const b = input("text", "to", "Upper bound");
  b.hidden = true;
  op.addEventListener("change", () => {
    const kind = op.value;
    a.type = b.type = kind === "time" ? "datetime-local" : kind === "range" ? "number" : "text";
    a.placeholder = kind === "equals" ? "value" : "from";
    a.hidden = kind === "exists";
    b.hidden = kind === "equals" || kind === "exists";
  });
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => row.remove());
  row.append(key, op, a, b, remove);
  container.append(row);
  key.focus();
}

// Adds the keys of `metadatas` (nested ones dotted, as filters name them) to the key fields'
// suggestions, sorted, so that a filter need not guess which keys the items have.
export function offerKeys(datalist, metadatas) {
  const keys = new Set([...datalist.options].map((o) => o.value));
  const walk = (obj, prefix, depth) => {
    for (const [k, v] of Object.entries(obj || {})) {
      if (keys.size >= MAX_KEYS) return;
      keys.add(prefix + k);
      if (v && typeof v === "object" && !Array.isArray(v) && depth < KEY_DEPTH) {
        walk(v, `${prefix}${k}.`, depth + 1);
      }
    }
  };
  const before = keys.size;
  for (const metadata of metadatas) walk(metadata, "", 1);
  if (keys.size === before) return;
  datalist.replaceChildren(...[...keys].sort().map((key) => {
    const option = document.createElement("option");
    option.value = key;
    return option;
  }));
}

function input(type, placeholder, label) {
  const el = document.createElement("input");
  el.type = type;
  el.placeholder = placeholder;
  el.setAttribute("aria-label", label);
  return el;
}

function scalar(text) {
  if (text === "true" || text === "false") return text === "true";
  if (text === "null") return null;
  if (text.trim() !== "" && !Number.isNaN(Number(text))) return Number(text);
  return text;
}

// The proto Filter the rows of `container` make (null for none), and how many rows count.
export function readFilters(container) {
  const filters = [];
  for (const row of container.querySelectorAll(".filter-row")) {
    const [key, op, a, b] = row.querySelectorAll("input, select");
    if (!key.value.trim()) continue;
    const field = { key: key.value.trim() };
    if (op.value === "equals") field.equals = scalar(a.value);
    if (op.value === "exists") field.exists = true;
    if (op.value === "range") {
      field.range = {};
      if (a.value !== "") field.range.gte = Number(a.value);
      if (b.value !== "") field.range.lte = Number(b.value);
    }
    if (op.value === "time") {
      field.timeRange = {};
      if (a.value) field.timeRange.gte = new Date(a.value).toISOString();
      if (b.value) field.timeRange.lte = new Date(b.value).toISOString();
    }
    filters.push({ field });
  }
  if (!filters.length) return { filter: null, count: 0 };
  return { filter: filters.length === 1 ? filters[0] : { allOf: { filters } },
           count: filters.length };
}
