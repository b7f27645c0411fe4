#!/usr/bin/env node
// Places one order through the dtm coordinator, from Node.js.
//
// Usage: node place_order.js [COORDINATOR_ADDRESS] [ORDER_ID]
//   COORDINATOR_ADDRESS  host:port of the coordinator (default 127.0.0.1:50050, `make up`'s)
//   ORDER_ID             the order id (default: node-<time>); the transaction id is txn-<ORDER_ID>,
//                        so running it again with the same id returns the first outcome instead
//                        of placing a second order.
//
// The order is one transaction of four branches (inventory, orders, payment, notification):
// 1 unit of "sku-apple" charged to "acct-alice", both in the services' default catalog.
// Prints the outcome and the reason; exits 0 only if the outcome is COMMITTED
// (1: ABORTED or UNKNOWN, 2: the call itself failed, 64: bad arguments).
//
// Everything is read from the project's own .proto files (protos/dtmpb/v1): @grpc/proto-loader
// builds the Coordinator client, and protobufjs encodes each branch's operation, which travels
// packed in a google.protobuf.Any ({type_url, value: serialized bytes}).

"use strict";

const path = require("path");
const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const DEFAULT_COORDINATOR = "127.0.0.1:50050";
const SKU = "sku-apple";
const ACCOUNT = "acct-alice";
const QUANTITY = 1;
const AMOUNT_CENTS = 250;
// The coordinator's default transaction timeout is 10 s; wait a little longer for its answer,
// so a slow decision is not taken for a lost one.
const SUBMIT_DEADLINE_MS = 15_000;
// The transaction id txn-<ORDER_ID> must stay a valid transaction id ([A-Za-z0-9._:-], 1..128).
const ID_PATTERN = /^[A-Za-z0-9._:-]{1,124}$/;

function usage(message) {
  process.stderr.write(`${message}\nusage: node place_order.js [COORDINATOR_ADDRESS] [ORDER_ID]\n`);
  process.exit(64);
}

// protobufjs root for the operation messages. `google/protobuf/any.proto` resolves to the copy
// bundled with protobufjs; every other import resolves under protos/.
function loadOperationTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    if (path.isAbsolute(target)) return target;
    const candidate = path.join(PROTO_ROOT, target);
    return fs.existsSync(candidate) ? candidate : protobuf.util.path.resolve(origin, target);
  };
  // keepCase: field names exactly as in the .proto (order_id), as with proto-loader below.
  root.loadSync("dtmpb/v1/shop.proto", { keepCase: true });
  root.resolveAll();
  return root;
}

// A google.protobuf.Any as @grpc/proto-loader expects it: the type URL and the serialized bytes.
function pack(root, typeName, fields) {
  const type = root.lookupType(typeName);
  // create() silently drops unknown keys; a misspelt field must not vanish from the order.
  const unknown = Object.keys(fields).filter((name) => !(name in type.fields));
  if (unknown.length > 0) throw new Error(`${typeName} has no field ${unknown.join(", ")}`);
  const problem = type.verify(fields);
  if (problem) throw new Error(`${typeName}: ${problem}`);
  return {
    type_url: `type.googleapis.com/${typeName}`,
    value: Buffer.from(type.encode(type.create(fields)).finish()),
  };
}

function orderRequest(root, orderId) {
  const lines = [{ sku: SKU, quantity: QUANTITY }];
  return {
    transaction_id: `txn-${orderId}`,
    timeout_ms: 0, // the coordinator's default
    branches: [
      { participant: "inventory", operation: pack(root, "dtm.v1.ReserveStock", { lines }) },
      {
        participant: "orders",
        operation: pack(root, "dtm.v1.CreateOrder", {
          order_id: orderId,
          customer_id: "cust-node",
          lines,
          amount_cents: AMOUNT_CENTS,
        }),
      },
      {
        participant: "payment",
        operation: pack(root, "dtm.v1.ChargePayment", {
          account_id: ACCOUNT,
          amount_cents: AMOUNT_CENTS,
          order_id: orderId,
        }),
      },
      {
        participant: "notification",
        operation: pack(root, "dtm.v1.SendNotification", {
          order_id: orderId,
          recipient: "cust-node@example.test",
          body: `Order ${orderId} confirmed: ${QUANTITY} x ${SKU}; ${AMOUNT_CENTS} cents charged.`,
        }),
      },
    ],
  };
}

function coordinatorClient(address) {
  const definition = protoLoader.loadSync("dtmpb/v1/coordinator.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (transaction_id, type_url)
    enums: String, // Outcome as its name, e.g. "OUTCOME_COMMITTED"
    longs: String,
    defaults: true,
  });
  const { Coordinator } = grpc.loadPackageDefinition(definition).dtm.v1;
  return new Coordinator(address, grpc.credentials.createInsecure());
}

function main() {
  const [address = DEFAULT_COORDINATOR, orderId = `node-${Date.now()}`, ...extra] =
    process.argv.slice(2);
  if (extra.length > 0) usage(`unexpected arguments: ${extra.join(" ")}`);
  if (!/^\S+$/.test(address)) usage(`not a coordinator address: ${JSON.stringify(address)}`);
  if (!ID_PATTERN.test(orderId)) usage(`not a valid order id ([A-Za-z0-9._:-], 1..124 characters): ${orderId}`);

  const root = loadOperationTypes();
  const request = orderRequest(root, orderId);
  const client = coordinatorClient(address);
  const deadline = new Date(Date.now() + SUBMIT_DEADLINE_MS);
  console.log(`placing order ${orderId} (${QUANTITY} x ${SKU}, ${AMOUNT_CENTS} cents from ${ACCOUNT}) via ${address}`);
  client.Submit(request, { deadline }, (error, response) => {
    client.close();
    if (error) {
      // DEADLINE_EXCEEDED or UNAVAILABLE: the outcome is not known; retrying with the same order
      // id is safe (same transaction id: the coordinator answers the first outcome).
      console.error(`Submit failed: ${grpc.status[error.code] ?? error.code}: ${error.details}`);
      process.exitCode = 2;
      return;
    }
    const outcome = String(response.outcome).replace(/^OUTCOME_/, "");
    console.log(`transaction ${response.transaction_id}: ${outcome}`);
    console.log(`reason: ${response.reason || "(none)"}`);
    for (const branch of response.branches) {
      const vote = String(branch.vote).replace(/^VOTE_/, "");
      const why = branch.reason ? ` (${branch.reason})` : "";
      console.log(`  branch ${branch.branch} ${branch.participant}: ${vote}${why}`);
    }
    process.exitCode = outcome === "COMMITTED" ? 0 : 1;
  });
}

main();
