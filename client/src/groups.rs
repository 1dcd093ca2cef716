//! Group membership as this device verifies it.
//!
//! The server reports changes, but a client shares its Megolm keys only with the members
//! it has verified itself: every change arrives with the Ed25519 signature of the device
//! that made it (over [`GroupChangeSigned`]), and is applied only if the signature holds,
//! it follows the last epoch this device applied, and its author was allowed to make it
//! (an admin, except for leaving). The rules are the server's; checking them again is
//! what keeps a compromised server from slipping in a listener.

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
}
