// Builds the dashboard's front end into ../static: our ES modules, HTML and CSS as they are, and
// uPlot's ES module and stylesheet from node_modules (installed by `npm ci` from package-lock.json).
// No bundler: browsers load the modules directly; the app serves every file itself (no CDN).
// Idempotent: the output is written to a fresh folder, then swapped in.
import { cpSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "static");
const staging = `${out}.building`;
const uplot = join(here, "node_modules", "uplot", "dist");

if (!existsSync(join(uplot, "uPlot.esm.js"))) {
  console.error("uPlot is not installed: run `npm ci` in dashboard/web first (or `make dashboard`)");
  process.exit(1);
}
rmSync(staging, { recursive: true, force: true });
mkdirSync(join(staging, "vendor"), { recursive: true });
for (const name of readdirSync(join(here, "src"))) {
  cpSync(join(here, "src", name), join(staging, name), { recursive: true });
}
cpSync(join(uplot, "uPlot.esm.js"), join(staging, "vendor", "uPlot.esm.js"));
cpSync(join(uplot, "uPlot.min.css"), join(staging, "vendor", "uPlot.min.css"));
cpSync(join(here, "node_modules", "uplot", "LICENSE"), join(staging, "vendor", "uPlot.LICENSE.txt"));
rmSync(out, { recursive: true, force: true });
renameSync(staging, out);
console.log(`dashboard front end built into ${out}`);
