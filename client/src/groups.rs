//! Group membership as this device verifies it.
//!
//! The server reports changes, but a client shares its Megolm keys only with the members
//! it has verified itself: every change arrives with the Ed25519 signature of the device
//! that made it (over [`GroupChangeSigned`]), and is applied only if the signature holds,
//! it follows the last epoch this device applied, and its author was allowed to make it
//! (an admin, except for leaving). The rules are the server's; checking them again is
//! what keeps a compromised server from slipping in a listener.
//!
//! A device added to a group never takes the membership from the server: it starts from
//! the signed change that added it (its author, an admin, and the members it added), and
//! learns the rest from the adding admin's own view, sent to it end to end encrypted
//! ([`encode_state`], accepted only over Olm from an admin of its view).

use tern_wire::messages::{GroupChange, GroupChangeSigned, GroupId, UserId};

use crate::store::GroupView;

/// Members per group at most (the server refuses more too).
pub const GROUP_MEMBERS_MAX: usize = 256;

/// Why a group change was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupChangeError {
    /// The signature does not verify with the author's pinned signing key.
    #[error("the change is not signed by its author")]
    BadSignature,
    /// Its epoch does not follow this device's view (a change was skipped or replayed).
    #[error("the change does not follow epoch {0}")]
    OutOfOrder(u64),
    /// The author may not make this change.
    #[error("the author may not make this change")]
    NotAllowed,
    /// The group would exceed 256 members.
    #[error("the group would have more than 256 members")]
    TooLarge,
}

/// The bytes a group change's signature covers.
pub fn signed_bytes(
    group_id: GroupId,
    base_epoch: u64,
    signer: (UserId, u32),
    change: &GroupChange,
) -> Vec<u8> {
    GroupChangeSigned::bytes(group_id, base_epoch, signer, change)
        .expect("a group change always archives")
}

/// Applies a change (already checked to be signed by `actor`) to this device's view of
/// the group; the result is the view at `epoch`.
pub fn apply_change(
    view: Option<&GroupView>,
    group_id: GroupId,
    epoch: u64,
    actor: UserId,
    change: &GroupChange,
    now_ms: u64,
) -> Result<GroupView, GroupChangeError> {
    let _ = now_ms;
    let group = match (change, view) {
        (GroupChange::Create { name, members }, None) => {
            if epoch != 1 {
                return Err(GroupChangeError::OutOfOrder(0));
            }
            let mut all = vec![(actor, true)];
            for member in members {
                if !all.iter().any(|(m, _)| m == member) {
                    all.push((*member, false));
                }
            }
            GroupView { group_id, epoch, name: name.clone(), members: all, needs_rotation: false }
        }
        (_, None) | (GroupChange::Create { .. }, Some(_)) => {
            return Err(GroupChangeError::OutOfOrder(view.map_or(0, |v| v.epoch)))
        }
        (change, Some(view)) => {
            if epoch != view.epoch + 1 {
                return Err(GroupChangeError::OutOfOrder(view.epoch));
            }
            let member = view.members.iter().find(|(m, _)| *m == actor);
            let allowed = match (change, member) {
                (_, None) => false,
                (GroupChange::Leave, Some(_)) => true,
                (_, Some((_, admin))) => *admin,
            };
            if !allowed {
                return Err(GroupChangeError::NotAllowed);
            }
            changed(view, epoch, actor, change)?
        }
    };
    if group.members.len() > GROUP_MEMBERS_MAX {
        return Err(GroupChangeError::TooLarge);
    }
    Ok(group)
}

/// A change by an allowed `actor` applied to an existing view, giving epoch `epoch`.
fn changed(
    view: &GroupView,
    epoch: u64,
    actor: UserId,
    change: &GroupChange,
) -> Result<GroupView, GroupChangeError> {
    let mut group = view.clone();
    group.epoch = epoch;
    match change {
        GroupChange::Add { members } => {
            for member in members {
                if !group.members.iter().any(|(m, _)| m == member) {
                    group.members.push((*member, false));
                }
            }
        }
        GroupChange::Remove { members } => {
            group.members.retain(|(m, _)| !members.contains(m));
            group.needs_rotation = true;
        }
        GroupChange::Leave => {
            group.members.retain(|(m, _)| *m != actor);
            group.needs_rotation = true;
        }
        GroupChange::Promote { member } | GroupChange::Demote { member } => {
            let admin = matches!(change, GroupChange::Promote { .. });
            if let Some(entry) = group.members.iter_mut().find(|(m, _)| m == member) {
                entry.1 = admin;
            }
        }
        GroupChange::Rename { name } => group.name = name.clone(),
        GroupChange::Create { .. } => return Err(GroupChangeError::OutOfOrder(view.epoch)),
    }
    // The last admin gone: the longest member takes over, as on the server
    // (members are kept in join order).
    if !group.members.is_empty() && !group.members.iter().any(|(_, admin)| *admin) {
        group.members[0].1 = true;
    }
    Ok(group)
}

/// The members a signed `Add` change vouches for, for a device it added: the admin who
/// made it and the users it added (its view until the admin's state arrives).
pub fn joined_view(group_id: GroupId, epoch: u64, admin: UserId, added: &[UserId]) -> GroupView {
    let mut members = vec![(admin, true)];
    for user in added.iter().take(GROUP_MEMBERS_MAX - 1) {
        if !members.iter().any(|(m, _)| m == user) {
            members.push((*user, false));
        }
    }
    GroupView { group_id, epoch, name: String::new(), members, needs_rotation: false }
}

/// Longest group name in a state message (the server's limit).
const GROUP_NAME_BYTES_MAX: usize = 100;

/// A group's state as an admin's device sends it to the members it added: group id,
/// epoch (u64 LE each), name (u16 LE length, UTF-8), members (u16 LE count, then each
/// user id u64 LE and an admin byte).
pub fn encode_state(view: &GroupView) -> Vec<u8> {
    let name = &view.name.as_bytes()[..view.name.len().min(GROUP_NAME_BYTES_MAX)];
    let members = &view.members[..view.members.len().min(GROUP_MEMBERS_MAX)];
    let mut out = Vec::with_capacity(20 + name.len() + 9 * members.len());
    out.extend_from_slice(&view.group_id.to_le_bytes());
    out.extend_from_slice(&view.epoch.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    for (user, admin) in members {
        out.extend_from_slice(&user.to_le_bytes());
        out.push(u8::from(*admin));
    }
    out
}

/// Parses [`encode_state`]; `None` for anything else (too long, too many members).
pub fn decode_state(bytes: &[u8]) -> Option<GroupView> {
    let group_id = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let epoch = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    let name_len = usize::from(u16::from_le_bytes(bytes.get(16..18)?.try_into().ok()?));
    if name_len > GROUP_NAME_BYTES_MAX {
        return None;
    }
    let name = std::str::from_utf8(bytes.get(18..18 + name_len)?).ok()?.to_string();
    let rest = bytes.get(18 + name_len..)?;
    let count = usize::from(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?));
    let entries = rest.get(2..)?;
    if count > GROUP_MEMBERS_MAX || entries.len() != 9 * count {
        return None;
    }
    let members = entries
        .chunks_exact(9)
        .map(|e| (u64::from_le_bytes(e[..8].try_into().expect("8 bytes")), e[8] != 0))
        .collect();
    Some(GroupView { group_id, epoch, name, members, needs_rotation: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> GroupView {
        let change = GroupChange::Create { name: "g".into(), members: vec![2, 3] };
        apply_change(None, 9, 1, 1, &change, 0).unwrap()
    }

    #[test]
    fn only_admins_change_membership_and_epochs_must_follow() {
        let group = created();
        assert_eq!(group.members, vec![(1, true), (2, false), (3, false)]);
        // A member who is no admin cannot add (a forged or unauthorised change).
        let add = GroupChange::Add { members: vec![66] };
        assert_eq!(apply_change(Some(&group), 9, 2, 2, &add, 0), Err(GroupChangeError::NotAllowed));
        // Nor can an outsider.
        assert_eq!(
            apply_change(Some(&group), 9, 2, 66, &add, 0),
            Err(GroupChangeError::NotAllowed)
        );
        // A skipped or replayed epoch is refused.
        assert_eq!(
            apply_change(Some(&group), 9, 3, 1, &add, 0),
            Err(GroupChangeError::OutOfOrder(1))
        );
        let grown = apply_change(Some(&group), 9, 2, 1, &add, 0).unwrap();
        assert!(grown.members.contains(&(66, false)));
        // Anyone may leave; removals call for a new sending session.
        let left = apply_change(Some(&grown), 9, 3, 3, &GroupChange::Leave, 0).unwrap();
        assert!(left.needs_rotation);
        assert!(!left.members.iter().any(|(m, _)| *m == 3));
    }

    #[test]
    fn the_257th_member_is_refused() {
        let members: Vec<UserId> = (2..=256).collect();
        let full =
            apply_change(None, 9, 1, 1, &GroupChange::Create { name: "g".into(), members }, 0)
                .unwrap();
        assert_eq!(full.members.len(), 256);
        let add = GroupChange::Add { members: vec![999] };
        assert_eq!(apply_change(Some(&full), 9, 2, 1, &add, 0), Err(GroupChangeError::TooLarge));
    }

    /// A joiner's first view is what the signed `Add` vouches for; a state message
    /// survives its encoding and anything longer, shorter or over the limits is refused.
    #[test]
    fn a_joiner_starts_from_the_signed_add_and_states_decode_strictly() {
        let joined = joined_view(9, 4, 1, &[5, 1, 5]);
        assert_eq!(joined.members, vec![(1, true), (5, false)]);
        let state = GroupView { epoch: 4, ..created() };
        let bytes = encode_state(&state);
        assert_eq!(decode_state(&bytes), Some(state));
        assert_eq!(decode_state(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_state(&[bytes.as_slice(), &[0]].concat()), None);
        let long = GroupView { name: "x".repeat(101), ..created() };
        let mut bytes = encode_state(&long);
        bytes[16..18].copy_from_slice(&101u16.to_le_bytes());
        bytes.splice(18..18 + 100, std::iter::repeat_n(b'x', 101));
        assert_eq!(decode_state(&bytes), None);
    }
}
