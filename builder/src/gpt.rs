//! (temporary stand-in until the gpt-ext4 branch lands)
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Guid(pub [u8; 16]);
impl std::str::FromStr for Guid {
    type Err = ();
    fn from_str(_: &str) -> Result<Self, ()> {
        Err(())
    }
}
pub mod types {
    pub fn by_name(n: &str) -> Option<super::Guid> {
        matches!(n, "esp" | "linux").then_some(super::Guid([0; 16]))
    }
}
