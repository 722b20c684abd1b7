// Drives the config server's status page in real headless Chromium (the system's, via
// playwright-core) and reports what it sees, one line per step on stdout:
//   SEEN      every address in WATCH is listed
//   VANISHED  the address in GONE disappeared without a reload, the others stayed
// Usage: node status_page.mjs URL SCREENSHOT_DIR WATCH(comma-separated) GONE
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
const { chromium } = require("playwright-core");

const [url, shots, watch, gone] = process.argv.slice(2);
const addresses = watch.split(",");
const row = (address) => `tr[data-address="${address}"]`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  for (const [name, viewport] of [["laptop", { width: 1280, height: 720 }], ["phone", { width: 390, height: 844 }]]) {
    const page = await browser.newPage({ viewport });
    await page.goto(url);
    for (const address of addresses) {
      await page.waitForSelector(row(address), { timeout: 15000 });
    }
    await page.screenshot({ path: path.join(shots, `status-page-${name}.png`), fullPage: true });
    if (name === "phone") {
      console.log("SEEN");
      // Keep polling; the test kills GONE now. No reload from here on.
      await page.waitForSelector(row(gone), { state: "detached", timeout: 20000 });
      for (const address of addresses.filter((a) => a !== gone)) {
        if (!(await page.$(row(address)))) throw new Error(`${address} vanished too`);
      }
      await page.screenshot({ path: path.join(shots, "status-page-after-kill.png"), fullPage: true });
      console.log("VANISHED");
    }
    await page.close();
  }
} finally {
  await browser.close();
}
