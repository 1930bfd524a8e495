// The client library under test, as library_scenario.mjs imports it: in Node this file
// re-exports clients/js; the browser run (browser/library.mjs) serves the library itself at
// /lockstep.js instead, so the page loads it unchanged, as an app would.
export { Lockstep } from '../../../clients/js/src/index.js';
