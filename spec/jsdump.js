#!/usr/bin/env node
// Parse a snapshot with the JavaScript build of the spec and the kaitai-struct runtime,
// as the Kaitai Web IDE does (debug build, _read() called by the caller), and print the
// parse tree as JSON: seq fields and instances by name; enums as {"enum", "value"}; byte
// arrays up to 64 bytes as {"hex"}, longer ones as {"len", "sha256"}; the `pages`
// instances (whole page regions) as {"len"}; an instance that fails as {"error"}.
//
//   node spec/jsdump.js FILE [--offset N] [--build DIR]
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
  process.stderr.write(`jsdump: ${message}\nusage: node jsdump.js FILE [--offset N] [--build DIR]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { file: null, offset: null, build: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--offset" || argv[i] === "--build") {
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
  process.stdout.write(JSON.stringify(dumpObject(spec, root)) + "\n");
}

main();
