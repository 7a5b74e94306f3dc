// Validates a .glb/.gltf with the Khronos glTF validator (npm gltf-validator) and prints its
// report summary as one JSON object: node tests/exporter/validate_gltf.js FILE
"use strict";
const fs = require("fs");
const path = require("path");
const validator = require(path.join(__dirname, "..", "..", "node_modules", "gltf-validator"));

const file = process.argv[2];
const data = new Uint8Array(fs.readFileSync(file));
validator
  .validateBytes(data, { maxIssues: 0 })
  .then((report) => {
    const issues = report.issues;
    console.log(JSON.stringify({
      validatorVersion: report.validatorVersion,
      numErrors: issues.numErrors,
      numWarnings: issues.numWarnings,
      numInfos: issues.numInfos,
      numHints: issues.numHints,
      messages: issues.messages.filter((m) => m.severity <= 1).slice(0, 50),
      info: report.info,
    }));
  })
  .catch((error) => {
    console.error(String(error));
    process.exit(2);
  });
