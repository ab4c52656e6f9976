//! crosstrace: a Kubernetes operator that rolls out cross-layer tracing.
//!
//! One `TracingPolicy` turns tracing on at the edge (ingress-nginx), in the workloads (OpenTelemetry
//! Collector sidecars) and in the network (Open vSwitch sFlow/IPFIX through a node agent), in
//! health-gated batches, and reverts it exactly when the policy goes away.
//!
//! The controller runs observe → plan → apply → report. Planning is pure (no client) and lives with
//! each layer in [`layers`]; [`controller`] wires observation, application and status around it.

pub mod admin;
pub mod agent;
pub mod api;
pub mod build;
pub mod canary;
pub mod check;
pub mod clients;
pub mod controller;
pub mod crashpoint;
pub mod flows;
pub mod http;
pub mod layers;
pub mod leader;
pub mod lean;
pub mod lenient;
pub mod memo;
pub mod metrics;
pub mod telemetry;
pub mod uninstall;
