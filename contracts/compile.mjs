// Compiles contracts/TestUSD.sol with the npm `solc` package (pinned in package.json) and writes
// the ABI and bytecode to scrapy_x402/contracts/TestUSD.json. Run with `make contracts`.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const here = dirname(fileURLToPath(import.meta.url));
const source = readFileSync(join(here, "TestUSD.sol"), "utf8");
const input = {
  language: "Solidity",
  sources: { "TestUSD.sol": { content: source } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const contract = output.contracts["TestUSD.sol"].TestUSD;
const artifact = {
  contractName: "TestUSD",
  compiler: `solc ${solc.version()}`,
  evmVersion: input.settings.evmVersion,
  abi: contract.abi,
  bytecode: "0x" + contract.evm.bytecode.object,
};
const target = join(here, "..", "scrapy_x402", "contracts", "TestUSD.json");
writeFileSync(target, JSON.stringify(artifact, null, 1) + "\n");
console.log(`wrote ${target} (${artifact.compiler})`);
