// Validates an AsyncAPI document with the AsyncAPI project's parser.
//
//   node scripts/asyncapi/validate.mjs <document.json>
//
// Prints one JSON line per diagnostic, then a JSON summary line
// {"errors": n, "channels": [...], "messages": [...]}; exits 1 when the
// parser reports an error (severity 0) or cannot build the document.
import { Parser } from '@asyncapi/parser';
import { readFileSync } from 'node:fs';

const path = process.argv[2];
if (!path) {
  console.error('usage: validate.mjs <document.json>');
  process.exit(2);
}
const { document, diagnostics } = await new Parser().parse(readFileSync(path, 'utf8'));
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
}
const errors = diagnostics.filter((d) => d.severity === 0).length;
const summary = { errors, parsed: Boolean(document), channels: [], messages: [] };
if (document) {
  summary.version = document.version();
  summary.channels = document.channels().all().map((c) => c.address());
  summary.messages = document.messages().all().map((m) => m.name());
}
console.log(JSON.stringify(summary));
process.exit(errors > 0 || !document ? 1 : 0);
