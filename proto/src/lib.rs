//! Generated code for the system's gRPC contracts; nothing hand-written lives here.
//!
//! Each package is one module (`registry::v1`, `logging::v1`, ...), and
//! [`FILE_DESCRIPTOR_SET`] carries all of them for the reflection service, so
//! `grpcurl -plaintext ADDR list` works without the .proto files.

/// `registry.v1`: the service registry.
pub mod registry {
    pub mod v1 {
        tonic::include_proto!("registry.v1");
    }
}

/// `logging.v1`: the message log.
pub mod logging {
    pub mod v1 {
        tonic::include_proto!("logging.v1");
    }
}

/// `messages.v1`: the messages stub.
pub mod messages {
    pub mod v1 {
        tonic::include_proto!("messages.v1");
    }
}

/// `facade.v1`: the front door over gRPC.
pub mod facade {
    pub mod v1 {
        tonic::include_proto!("facade.v1");
    }
}

/// Every contract above as an encoded `FileDescriptorSet`, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");
