// Compiles the test contracts with the npm `solc` package (pinned in package.json) and writes
// their ABI and bytecode to scrapy_x402/contracts/<Name>.json. Run with `make contracts`.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const here = dirname(fileURLToPath(import.meta.url));
const files = ["TestUSD.sol", "Permit2Lite.sol", "X402BatchSettlementLite.sol"];
const wanted = [
  "TestUSD",
  "Permit2Lite",
  "X402ExactPermit2ProxyLite",
  "X402UptoPermit2ProxyLite",
  "X402BatchSettlementLite",
  "ERC3009DepositCollectorLite",
  "Permit2DepositCollectorLite",
  "Multicall3Lite",
];
const input = {
  language: "Solidity",
  sources: Object.fromEntries(files.map((f) => [f, { content: readFileSync(join(here, f), "utf8") }])),
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
for (const [file, contracts] of Object.entries(output.contracts)) {
  for (const [name, contract] of Object.entries(contracts)) {
    if (!wanted.includes(name)) continue;
    const artifact = {
      contractName: name,
      source: `contracts/${file}`,
      compiler: `solc ${solc.version()}`,
      evmVersion: input.settings.evmVersion,
      abi: contract.abi,
      bytecode: "0x" + contract.evm.bytecode.object,
      deployedBytecode: "0x" + contract.evm.deployedBytecode.object,
    };
    const target = join(here, "..", "scrapy_x402", "contracts", `${name}.json`);
    writeFileSync(target, JSON.stringify(artifact, null, 1) + "\n");
    console.log(`wrote ${target} (${artifact.compiler})`);
  }
}
