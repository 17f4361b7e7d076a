#!/usr/bin/env node
// Compile the .ksy with the official Kaitai Struct compiler (the JavaScript build the
// Web IDE runs). Usage: node compile.js [LANGUAGE] [OUTDIR] [--debug]   (default: python ./build)
// --debug makes the build the Web IDE uses: _read() is called by the caller, and each
// field records its offsets and enum in _debug. Exits non-zero on any error or warning,
// so the spec stays warning-free.
"use strict";
const fs = require("fs");
const path = require("path");
const yaml = require("js-yaml");
const compiler = require("kaitai-struct-compiler");

const args = process.argv.slice(2).filter((a) => a !== "--debug");
const debug = process.argv.includes("--debug");
const language = args[0] || "python";
const outDir = args[1] || path.join(__dirname, "build");
const source = path.join(__dirname, "qemu_mapped_ram.ksy");

const problems = [];
for (const level of ["log", "warn", "error"]) {
  const original = console[level];
  console[level] = (...args) => {
    problems.push(args.join(" "));
    original.apply(console, args);
  };
}

const ksy = yaml.load(fs.readFileSync(source, "utf8"));
compiler
  .compile(language, ksy, null, debug)
  .then((files) => {
    fs.mkdirSync(outDir, { recursive: true });
    for (const [name, contents] of Object.entries(files)) {
      fs.writeFileSync(path.join(outDir, name), contents);
      process.stdout.write(`${path.join(outDir, name)}\n`);
    }
    if (problems.length) {
      process.stderr.write(`kaitai-struct-compiler ${compiler.version}: ${problems.length} warning(s)\n`);
      process.exit(1);
    }
  })
  .catch((err) => {
    const text = String(err && err.jl_Throwable__f_jsErrorForStackTrace ? err.jl_Throwable__f_jsErrorForStackTrace : err);
    process.stderr.write(`kaitai-struct-compiler ${compiler.version}: ${text}\n`);
    process.exit(1);
  });
