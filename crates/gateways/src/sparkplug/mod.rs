//! Sparkplug B (Eclipse Sparkplug 3.0): the payload codec, the topic
//! namespace and the host application's view of edge-node sessions.

pub mod edge;
pub mod host_state;
pub mod payload;
pub mod topic;

#[cfg(test)]
pub(crate) mod tests;

pub use edge::{rebirth_request, EdgeKey, Event, HostConfig, Rejection, SparkplugHost};
pub use host_state::{HostState, HostStateError};
pub use payload::{
    decode_payload, encode_payload, metric_value, DataType, Metric, MetricValue, Payload,
    PayloadError, PropertySet, PropertyValue, ValueError,
};
pub use topic::{parse_topic, EdgeTopic, MessageType, Topic, TopicError};
