//! The lab's bookservice: its gRPC flavour, shared by the service and the poller.

pub mod grpc;
