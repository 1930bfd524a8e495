#!/usr/bin/env node
// Presigned object access from a real browser: headless Chromium reads and writes objects
// directly in S3-compatible storage with URLs signed by Lockstep, across three origins.
//
//   node browser/presign.mjs '{"http":"http://127.0.0.1:PORT","team":"t1","token":"…",
//     "read":{"item":"scan-9","names":["frames/000000.bin",…],"sizes":[1,…],"seed":N},
//     "write":{"item":"result-1","name":"checks/result.json","content_type":"application/json"},
//     "page_port":NNNN}'
//
// Serves presign.html on http://127.0.0.1:<page_port> (Lockstep's allowed origin in the
// harness; the storage server's CORS front allows it too), opens it in Debian's Chromium through
// playwright-core (which never downloads browsers), runs the page's scenario and waits for
// window.__result (../shared/browser_harness.mjs). The page: one batch of GET URLs from Lockstep,
// all objects fetched in parallel from the storage server and checked byte for byte, then the
// item lock, a PUT URL, the upload of a result file and its commit. Exit 0 after printing
// `OK {summary}` on stdout (the summary carries the uploaded text, which the Rust test compares
// with the stored object); exit 1 with the reason on stderr.

import { makeRedactor } from '../shared/common.mjs';
import { runPage, singlePage } from '../shared/browser_harness.mjs';

runPage({
  script: 'browser/presign.mjs',
  configFail: 'FAIL',
  // Tokens and signatures stay out of the output.
  redactor: (cfg) => {
    const redactToken = makeRedactor({ page: cfg.token });
    return (line) => redactToken(line).replace(/(X-Amz-Signature=)[0-9a-f]+/g, '$1<redacted>');
  },
  routes: singlePage('presign.html'),
  budgetMs: () => 60_000,
  traceName: 'page trace',
});
