// Drives the config server's status page in real headless Chromium (the system's, via
// playwright-core) and reports what it sees, one line per step on stdout:
//   SEEN      every address in WATCH is listed
//   VANISHED  the address in GONE disappeared without a reload, the others stayed, and
//             it is listed under "Recently removed"; the screenshots are written
// The screenshots (status-page.png at laptop width, status-page-phone.png at phone
// width) are taken after the removal, and each carries in a PNG text chunk ("layout")
// what it shows: every table with its columns, and the heartbeat the page states.
// Usage: node status_page.mjs URL SCREENSHOT_DIR WATCH(comma-separated) GONE
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import zlib from "node:zlib";

const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
const { chromium } = require("playwright-core");

const [url, shots, watch, gone] = process.argv.slice(2);
const addresses = watch.split(",");
const stay = addresses.filter((a) => a !== gone);
const row = (address) => `tr[data-address="${address}"]`;
const removed = `tr[data-removed="${gone}"]`;

// The tables the page shows (by title), each with its columns, and its heartbeat.
async function layout(page) {
  return page.evaluate(() => ({
    tables: [...document.querySelectorAll("section")].map((section) => ({
      table: section.querySelector("h2").firstChild.textContent.trim(),
      columns: [...section.querySelectorAll("tbody tr:first-child td")].map((td) => td.dataset.label),
    })),
    heartbeat: (document.getElementById("summary").textContent.match(/heartbeat every \d+ ms/) || [""])[0],
  }));
}

// The screenshot at `file`, with `text` in a tEXt chunk named "layout" after IHDR.
async function shoot(page, file) {
  await page.screenshot({ path: file, fullPage: true });
  const png = readFileSync(file);
  const type = Buffer.from("tEXt", "latin1");
  const data = Buffer.from("layout\0" + JSON.stringify(await layout(page)), "latin1");
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(Buffer.concat([type, data])) >>> 0);
  const ihdrEnd = 8 + 4 + 4 + 13 + 4;
  writeFileSync(file, Buffer.concat([png.subarray(0, ihdrEnd), length, type, data, crc, png.subarray(ihdrEnd)]));
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const laptop = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  await laptop.goto(url);
  for (const address of addresses) {
    await laptop.waitForSelector(row(address), { timeout: 15000 });
  }
  console.log("SEEN");
  // Keep polling; the test kills GONE now. No reload from here on.
  await laptop.waitForSelector(row(gone), { state: "detached", timeout: 20000 });
  for (const address of stay) {
    if (!(await laptop.$(row(address)))) throw new Error(`${address} vanished too`);
  }
  await laptop.waitForSelector(removed, { timeout: 15000 });
  await shoot(laptop, path.join(shots, "status-page.png"));

  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await phone.goto(url);
  for (const selector of [...stay.map(row), removed]) {
    await phone.waitForSelector(selector, { timeout: 15000 });
  }
  await shoot(phone, path.join(shots, "status-page-phone.png"));
  console.log("VANISHED");
} finally {
  await browser.close();
}
