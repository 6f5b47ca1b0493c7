// Runs the Khronos glTF validator (npm gltf-validator, installed by install.sh into .tools/) on each file given;
// prints one JSON line per file: {"file": path, "issues": <the validator's issues object>}.
const validator = require('gltf-validator');
const fs = require('fs');

(async () => {
  for (const file of process.argv.slice(2)) {
    const report = await validator.validateBytes(new Uint8Array(fs.readFileSync(file)), {maxIssues: 1000});
    console.log(JSON.stringify({file: file, issues: report.issues}));
  }
})().catch((err) => { console.error(String(err)); process.exit(1); });
