//! The appliance multi-call binary (being written).
