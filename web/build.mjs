// Builds the dashboard: node build.mjs [OUT]   (OUT defaults to web/dist)
//
//   OUT/app.js      src/main.js and what it imports, minified (iife, es2020)
//   OUT/app.css     xterm's stylesheet and src/style.css, imported by main.js
//   OUT/index.html  src/index.html as it is
//
// The host compiles these files into its binary and serves index.html at
// `/` and the rest under `/assets/`. Works offline once node_modules exists.

import { copyFile, mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, 'dist'));

await mkdir(out, { recursive: true });

const result = await build({
  absWorkingDir: here,
  entryPoints: ['src/main.js'],
  bundle: true,
  minify: true,
  format: 'iife',
  target: 'es2020',
  // CSS imported from main.js lands next to it, named after it: app.css.
  outfile: join(out, 'app.js'),
  charset: 'utf8',
  // Licence comments of the bundled libraries stay, at the end of each file.
  legalComments: 'eof',
  logLevel: 'warning',
  metafile: true,
});

await copyFile(join(here, 'src/index.html'), join(out, 'index.html'));

const sizes = Object.entries(result.metafile.outputs)
  .map(([file, o]) => `${file.split('/').pop()} ${(o.bytes / 1024).toFixed(0)} KiB`)
  .join(', ');
console.log(`web: ${out}: ${sizes}`);
