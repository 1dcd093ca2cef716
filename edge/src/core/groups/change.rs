//! The rules of a group change, as a pure function: the group as stored, a signed
//! change, its actor → the group after, or the rule it breaks.
//!
//! The server checks these as hygiene and to keep one order; clients check the same
//! rules again from the signed changes before they trust a membership. Admins change
//! the group, anyone may leave; a change names the epoch it was made against (a stale
//! one is refused: refresh and sign again); at most 256 members; the last admin gone,
//! the longest member takes over.

use tern_engine::GroupRecord;
use tern_wire::messages::{GroupChange, GroupId, GroupMember, UserId};

use crate::refusal::GroupRefusal;

/// Members per group at most.
pub const GROUP_MEMBERS_MAX: usize = 256;
/// Bytes of a group's name at most.
pub const GROUP_NAME_BYTES_MAX: usize = 100;

fn check_name(name: &str) -> Result<(), GroupRefusal> {
    match name.len() > GROUP_NAME_BYTES_MAX {
        true => Err(GroupRefusal::NameTooLong { bytes: name.len(), max: GROUP_NAME_BYTES_MAX }),
        false => Ok(()),
    }
}

/// A change applied: the group after it, and who left or was removed (they hear of
/// the change too).
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    /// The group after the change (its epoch one higher).
    pub group: GroupRecord,
    /// Who is no longer a member.
    pub removed: Vec<UserId>,
}

/// Applies `change` by `actor` made against `base_epoch` to `current` (`None`: no such
/// group yet). `valid_user` says whether an id names a possible user (an existing shard).
pub fn apply(
    group_id: GroupId,
    current: Option<GroupRecord>,
    change: &GroupChange,
    (actor, base_epoch): (UserId, u64),
    now_ms: u64,
    valid_user: impl Fn(UserId) -> bool,
) -> Result<Applied, GroupRefusal> {
    match (change, current) {
        (GroupChange::Create { name, members }, None) => {
            if base_epoch != 0 {
                return Err(GroupRefusal::NewGroupEpoch);
            }
            check_name(name)?;
            let mut all = vec![actor];
            for member in members {
                if !all.contains(member) && valid_user(*member) {
                    all.push(*member);
                }
            }
            if all.len() > GROUP_MEMBERS_MAX {
                return Err(GroupRefusal::Full);
            }
            let members = all
                .into_iter()
                .map(|user_id| GroupMember { user_id, admin: user_id == actor, joined_ms: now_ms })
                .collect();
            let group =
                GroupRecord { group_id, name: name.clone(), epoch: 1, created_ms: now_ms, members };
            Ok(Applied { group, removed: Vec::new() })
        }
        (GroupChange::Create { .. }, Some(_)) => Err(GroupRefusal::IdTaken),
        (_, None) => Err(GroupRefusal::NoSuchGroup),
        (change, Some(group)) => {
            change_existing(group, change, (actor, base_epoch), now_ms, valid_user)
        }
    }
}

fn change_existing(
    mut group: GroupRecord,
    change: &GroupChange,
    (actor, base_epoch): (UserId, u64),
    now_ms: u64,
    valid_user: impl Fn(UserId) -> bool,
) -> Result<Applied, GroupRefusal> {
    if base_epoch != group.epoch {
        return Err(GroupRefusal::StaleEpoch);
    }
    if !is_member(&group, actor) {
        return Err(GroupRefusal::NotMember);
    }
    let admin_only = !matches!(change, GroupChange::Leave);
    if admin_only && !group.members.iter().any(|m| m.user_id == actor && m.admin) {
        return Err(GroupRefusal::NotAdmin);
    }
    let mut removed = Vec::new();
    match change {
        GroupChange::Add { members } => {
            for member in members {
                if !is_member(&group, *member) && valid_user(*member) {
                    group.members.push(GroupMember {
                        user_id: *member,
                        admin: false,
                        joined_ms: now_ms,
                    });
                }
            }
            if group.members.len() > GROUP_MEMBERS_MAX {
                return Err(GroupRefusal::Full);
            }
        }
        GroupChange::Remove { members } => {
            group.members.retain(|m| !members.contains(&m.user_id));
            removed.extend(members.iter().copied());
        }
        GroupChange::Leave => {
            group.members.retain(|m| m.user_id != actor);
            removed.push(actor);
        }
        GroupChange::Promote { member } | GroupChange::Demote { member } => {
            let admin = matches!(change, GroupChange::Promote { .. });
            let m = group.members.iter_mut().find(|m| m.user_id == *member);
            m.ok_or(GroupRefusal::NoSuchMember)?.admin = admin;
        }
        GroupChange::Rename { name } => {
            check_name(name)?;
            group.name = name.clone();
        }
        GroupChange::Create { .. } => return Err(GroupRefusal::IdTaken),
    }
    keep_an_admin(&mut group);
    group.epoch += 1;
    Ok(Applied { group, removed })
}

fn is_member(group: &GroupRecord, user: UserId) -> bool {
    group.members.iter().any(|m| m.user_id == user)
}

/// The last admin gone: the longest member takes over.
pub fn keep_an_admin(group: &mut GroupRecord) {
    if !group.members.is_empty() && !group.members.iter().any(|m| m.admin) {
        if let Some(oldest) = group.members.iter_mut().min_by_key(|m| m.joined_ms) {
            oldest.admin = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(members: Vec<UserId>) -> GroupRecord {
        let change = GroupChange::Create { name: "g".into(), members };
        apply(9, None, &change, (1, 0), 10, |_| true).unwrap().group
    }

    /// The rules, one by one: who may do what, epochs, the member cap, and the longest
    /// member taking over from the last admin.
    #[test]
    fn group_rules() {
        let group = create(vec![2, 3, 2]);
        assert_eq!(group.members.len(), 3, "the creator once, duplicates dropped");
        assert_eq!(group.epoch, 1);
        let add = GroupChange::Add { members: vec![4] };
        let refuse = |g: &GroupRecord, c: &GroupChange, actor, epoch| {
            apply(9, Some(g.clone()), c, (actor, epoch), 20, |_| true).unwrap_err()
        };
        assert_eq!(refuse(&group, &add, 2, 1), GroupRefusal::NotAdmin);
        assert_eq!(refuse(&group, &add, 1, 0), GroupRefusal::StaleEpoch);
        assert_eq!(refuse(&group, &add, 7, 1), GroupRefusal::NotMember);
        let create_again = GroupChange::Create { name: "x".into(), members: vec![] };
        assert_eq!(refuse(&group, &create_again, 1, 1), GroupRefusal::IdTaken);
        let many = GroupChange::Add { members: (100..400).collect() };
        assert_eq!(refuse(&group, &many, 1, 1), GroupRefusal::Full);
        let left =
            apply(9, Some(group.clone()), &GroupChange::Leave, (1, 1), 20, |_| true).unwrap();
        assert_eq!(left.removed, vec![1]);
        assert!(left.group.members.iter().any(|m| m.admin), "someone took over");
        assert_eq!(left.group.epoch, 2);
        let gone = apply(9, None, &add, (1, 1), 20, |_| true).unwrap_err();
        assert_eq!(gone, GroupRefusal::NoSuchGroup);
    }

    #[test]
    fn a_group_name_has_at_most_100_bytes() {
        let long = GroupChange::Create { name: "n".repeat(101), members: vec![] };
        let refused = apply(9, None, &long, (1, 0), 10, |_| true).unwrap_err();
        assert_eq!(refused, GroupRefusal::NameTooLong { bytes: 101, max: 100 });
        let group = create(vec![2]);
        let rename = GroupChange::Rename { name: "é".repeat(51) }; // 102 bytes
        let refused = apply(9, Some(group.clone()), &rename, (1, 1), 20, |_| true).unwrap_err();
        assert_eq!(refused, GroupRefusal::NameTooLong { bytes: 102, max: 100 });
        let rename = GroupChange::Rename { name: "n".repeat(100) };
        assert!(apply(9, Some(group), &rename, (1, 1), 20, |_| true).is_ok());
    }
}
