// A lossd client in Node.js, written from proto/lossd/v1/loss_service.proto alone: no generated
// code, no lossd library. tests/test_interop.py runs it against a real server and checks what it
// wrote against the Python reference for the same inputs.
//
//   node ols_client.js TARGET INPUT.json OUTPUT.json
//
// INPUT: {session, n_classes, alpha, smoothing, epochs: [[{n, logits, labels}, ...], ...]}, with
// logits as base64 float32 little-endian [n, C] and labels as base64 int64 little-endian [n].
// It creates an OLS session, runs every batch of every epoch as a training ComputeLoss tagged
// with its epoch, calls NextEpoch after each epoch, and writes OUTPUT: per batch the loss, the
// gradient (base64 float32) and the counts, then the final soft labels (GetState).
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function loadService() {
  const definition = protoLoader.loadSync("lossd/v1/loss_service.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto
    longs: String, // int64 as decimal strings: no precision lost
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).lossd.v1.LossService;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (error, response) =>
      error ? reject(new Error(`${method}: ${error.code} ${error.details}`)) : resolve(response),
    );
  });
}

function float32Tensor(base64, shape) {
  return { dtype: "DTYPE_FLOAT32", shape: shape.map(String), data: Buffer.from(base64, "base64") };
}

function decodeFloat32(tensor) {
  if (tensor.dtype !== "DTYPE_FLOAT32") throw new Error(`expected float32, got ${tensor.dtype}`);
  return Buffer.from(tensor.data).toString("base64");
}

async function main() {
  const [target, inputPath, outputPath] = process.argv.slice(2);
  const input = JSON.parse(fs.readFileSync(inputPath, "utf8"));
  const LossService = loadService();
  const client = new LossService(target, grpc.credentials.createInsecure());
  const c = input.n_classes;
  await call(client, "CreateSession", {
    name: input.session,
    spec: {
      kind: "LOSS_KIND_ONLINE_LABEL_SMOOTHING",
      n_classes: String(c),
      smoothing: input.smoothing,
      alpha: input.alpha,
      convention: "SMOOTHING_CONVENTION_OFF_TARGET",
      reduction: "REDUCTION_MEAN",
    },
  });
  const batches = [];
  for (let epoch = 0; epoch < input.epochs.length; epoch++) {
    for (const [index, batch] of input.epochs[epoch].entries()) {
      const response = await call(client, "ComputeLoss", {
        session: input.session,
        logits: float32Tensor(batch.logits, [batch.n, c]),
        labels: { dtype: "DTYPE_INT64", shape: [String(batch.n)], data: Buffer.from(batch.labels, "base64") },
        training: true,
        need_grad: true,
        request_id: `node-${epoch}-${index}`,
        epoch: String(epoch),
      });
      if (Number(response.grad_exponent) !== 0) throw new Error("float32 gradients are never scaled");
      batches.push({
        epoch: Number(response.epoch),
        loss: decodeFloat32(response.loss),
        grad: decodeFloat32(response.grad),
        n_used: Number(response.n_used),
        n_correct: Number(response.n_correct),
      });
    }
    const session = await call(client, "NextEpoch", { session: input.session, epoch: String(epoch), rank: "0" });
    if (Number(session.epoch) !== epoch + 1) throw new Error(`NextEpoch left epoch ${session.epoch}`);
  }
  const state = await call(client, "GetState", { session: input.session });
  fs.writeFileSync(
    outputPath,
    JSON.stringify({ batches, epoch: Number(state.epoch), supervise: decodeFloat32(state.supervise) }),
  );
  client.close();
}

main().catch((error) => {
  console.error(`ols_client.js: ${error.message}`);
  process.exit(1);
});
