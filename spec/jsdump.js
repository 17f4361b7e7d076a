#!/usr/bin/env node
// Parse a snapshot with the JavaScript build of the spec and the kaitai-struct runtime,
// as the Kaitai Web IDE does (debug build, _read() called by the caller), and print the
// parse tree as JSON: seq fields and instances by name; enums as {"enum", "value"}; byte
// arrays up to 64 bytes as {"hex"}, longer ones as {"len", "sha256"}; the `pages`
// instances (whole page regions) as {"len"}; an instance that fails as {"error"}.
// --html prints the tree as a page instead: collapsible nodes with each field's file
// offsets, the way the Web IDE's object tree shows them.
//
//   node spec/jsdump.js FILE [--offset N] [--build DIR] [--html]
//
// --build DIR loads DIR/QemuMappedRam.js (`node spec/compile.js javascript DIR --debug`);
// without it the .ksy is compiled in-process. --offset N parses a bare QEVM stream at N.
"use strict";
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const { KaitaiStream } = require("kaitai-struct");

const SIZE_ONLY = new Set(["pages"]); // whole RAM regions: length only
const ALIASES = new Set(["prev"]); // another node of the tree: left out, or the dump would repeat it

function usage(message) {
  process.stderr.write(`jsdump: ${message}\nusage: node jsdump.js FILE [--offset N] [--build DIR] [--html]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { file: null, offset: null, build: null, html: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--html") {
      args.html = true;
    } else if (argv[i] === "--offset" || argv[i] === "--build") {
      if (i + 1 >= argv.length) usage(`${argv[i]} needs a value`);
      args[argv[i].slice(2)] = argv[++i];
    } else if (args.file === null) {
      args.file = argv[i];
    } else {
      usage(`unexpected argument ${argv[i]}`);
    }
  }
  if (args.file === null) usage("no FILE");
  if (args.offset !== null) {
    const n = Number(args.offset);
    if (!Number.isSafeInteger(n) || n < 0) usage(`bad offset ${args.offset}`);
    args.offset = n;
  }
  return args;
}

async function moduleSource(build) {
  if (build !== null) return fs.readFileSync(path.join(build, "QemuMappedRam.js"), "utf8");
  const yaml = require("js-yaml");
  const compiler = require("kaitai-struct-compiler");
  const ksy = yaml.load(fs.readFileSync(path.join(__dirname, "qemu_mapped_ram.ksy"), "utf8"));
  const files = await compiler.compile("javascript", ksy, null, true);
  return files["QemuMappedRam.js"];
}

function loadSpec(source) {
  // The generated module is UMD and requires "kaitai-struct/KaitaiStream": hand it the runtime.
  const exports = {};
  const req = (name) => (name === "kaitai-struct/KaitaiStream" ? KaitaiStream : require(name));
  new Function("exports", "require", source)(exports, req);
  return exports.QemuMappedRam;
}

function bytes(value, name) {
  if (SIZE_ONLY.has(name)) return { len: value.length };
  if (value.length <= 64) return { hex: Buffer.from(value).toString("hex") };
  const sha256 = crypto.createHash("sha256").update(value).digest("hex");
  return { len: value.length, sha256 };
}

function enumOf(spec, obj, name) {
  const info = obj._debug && (obj._debug[name] || obj._debug[`_m_${name}`]);
  if (!info || !info.enumName) return null;
  let table = { QemuMappedRam: spec };
  for (const part of info.enumName.split(".")) table = table && table[part];
  return table || null;
}

function dump(spec, value, name, owner) {
  if (value instanceof Uint8Array) return bytes(value, name);
  if (Array.isArray(value)) return value.map((item) => dump(spec, item, name, null));
  if (value !== null && typeof value === "object") return dumpObject(spec, value);
  if (owner !== null && typeof value === "number") {
    const table = enumOf(spec, owner, name);
    if (table) return { enum: table[value] === undefined ? null : table[value], value };
  }
  return value;
}

function dumpObject(spec, obj) {
  const out = {};
  const put = (name, get) => {
    if (name.startsWith("_") || ALIASES.has(name)) return;
    let value;
    try {
      value = get();
    } catch (err) {
      out[name] = { error: err && err.message ? `${err.name}: ${err.message}` : String(err) };
      return;
    }
    if (value !== undefined && value !== null) out[name] = dump(spec, value, name, obj);
  };
  for (const name of Object.keys(obj)) put(name, () => obj[name]);
  const proto = Object.getPrototypeOf(obj);
  for (const name of Object.getOwnPropertyNames(proto)) {
    const desc = Object.getOwnPropertyDescriptor(proto, name);
    if (desc.get) put(name, () => obj[name]);
  }
  return out;
}

// -- --html: the tree as a page ----------------------------------------------------------

const OPEN = new Set(["stream", "elements", "ramStart", "blocks", "mappedRamHeader"]);  // opened on the page

function esc(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function hex(n) {
  return `0x${n.toString(16)}`;
}

function span(info) {
  if (!info || info.start === undefined || info.end === undefined) return "";
  const start = info.start + (info.ioOffset || 0);
  return `<span class="pos">[${hex(start)}, ${hex(info.end + (info.ioOffset || 0))})</span>`;
}

function leaf(spec, value, name, owner) {
  if (value instanceof Uint8Array) {
    if (SIZE_ONLY.has(name)) return `<span class="b">[${value.length} bytes, not shown]</span>`;
    const head = Buffer.from(value.subarray(0, 16)).toString("hex").replace(/(..)/g, "$1 ").trim();
    return `<span class="b">[${value.length} bytes] ${head}${value.length > 16 ? " …" : ""}</span>`;
  }
  if (typeof value === "number") {
    const table = owner ? enumOf(spec, owner, name) : null;
    if (table) return `<span class="e">${esc(table[value] || "?")}</span> <span class="n">(${value})</span>`;
    return `<span class="n">${value}</span>${value > 9 ? ` <span class="h">(${hex(value)})</span>` : ""}`;
  }
  if (typeof value === "string") return `<span class="s">"${esc(value)}"</span>`;
  return `<span class="v">${esc(value)}</span>`;
}

function htmlNode(spec, name, value, owner, info, depth) {
  const label = `<span class="k">${esc(name)}</span>`;
  if (value !== null && typeof value === "object" && !(value instanceof Uint8Array)) {
    const items = Array.isArray(value)
      ? value.map((item, i) => htmlNode(spec, String(i), item, null, info && info.arr && info.arr[i], depth + 1))
      : htmlFields(spec, value, depth + 1);
    let kind = Array.isArray(value) ? `[${value.length}]` : (value.constructor && value.constructor.name) || "";
    const title = Array.isArray(value) ? undefined : value.idstr;  // a block's or a section's name
    if (typeof title === "string") kind += ` "${title}"`;
    // aliases (value instances such as qevm_stream.ram_start) have no offsets: left closed
    const seq = info && info.start !== undefined;
    const open = depth < 1 || (OPEN.has(name) && seq) || (name === "0" && depth < 6) ? " open" : "";
    const head = `<summary>${label} <span class="t">${esc(kind)}</span> ${span(info)}</summary>`;
    return `<li><details${open}>${head}<ul>${items.join("")}</ul></details></li>`;
  }
  return `<li>${label} = ${leaf(spec, value, name, owner)} ${span(info)}</li>`;
}

function htmlFields(spec, obj, depth) {
  const out = [];
  const names = Object.keys(obj).filter((n) => !n.startsWith("_"));
  const proto = Object.getPrototypeOf(obj);
  for (const n of Object.getOwnPropertyNames(proto)) {
    const desc = Object.getOwnPropertyDescriptor(proto, n);
    if (desc.get && !n.startsWith("_")) names.push(n);
  }
  for (const name of names) {
    if (ALIASES.has(name)) continue;
    let value;
    try {
      value = obj[name];
    } catch (err) {
      out.push(`<li><span class="k">${esc(name)}</span> = <span class="err">${esc(err.name)}: ${esc(err.message)}</span></li>`);
      continue;
    }
    if (value === undefined || value === null) continue;
    const info = obj._debug && (obj._debug[name] || obj._debug[`_m_${name}`]);
    out.push(htmlNode(spec, name, value, obj, info, depth));
  }
  return out;
}

function htmlPage(spec, root, file) {
  const style = `body{font:13px/1.45 "DejaVu Sans Mono",monospace;margin:12px 16px;color:#222}
h1{font-size:14px;margin:0 0 8px}ul{list-style:none;margin:0;padding-left:18px}summary{cursor:pointer}
.k{color:#1a4e8a}.t{color:#888}.n{color:#0a7a3a}.h{color:#6a6a6a}.s{color:#a4410e}.e{color:#7b2c9e}
.b{color:#555}.pos{color:#aaa;font-size:11px}.err{color:#c00}.v{color:#0a7a3a}`;
  const title = `${path.basename(file)}: parsed by qemu_mapped_ram.ksy (JavaScript build, kaitai-struct runtime)`;
  const tree = htmlFields(spec, root, 0).join("");
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title><style>${style}</style></head><body><h1>${esc(title)}</h1><ul>${tree}</ul></body></html>\n`;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let data;
  try {
    data = fs.readFileSync(args.file);
  } catch (err) {
    process.stderr.write(`jsdump: ${args.file}: ${err.message}\n`);
    process.exit(2);
  }
  const spec = loadSpec(await moduleSource(args.build));
  const io = new KaitaiStream(data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
  let root;
  try {
    if (args.offset === null) {
      root = new spec(io, null, null);
    } else {
      io.seek(args.offset);
      root = new spec.QevmStream(io, null, null);
    }
    root._read();
  } catch (err) {
    process.stderr.write(`jsdump: ${args.file}: ${err.message || err}\n`);
    process.exit(1);
  }
  process.stdout.write(args.html ? htmlPage(spec, root, args.file) : JSON.stringify(dumpObject(spec, root)) + "\n");
}

main();
