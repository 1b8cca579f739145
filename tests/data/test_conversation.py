from megatron_visualchat.data import Conversation, Round, image_ref
from megatron_visualchat.data.conversation import check_refs, referenced_images, resolve_refs
from megatron_visualchat.data.images import FileImage

A, B = FileImage("a.png"), FileImage("b.png")


def test_concat_shifts_references_and_records_members():
    first = Conversation((Round(f"{image_ref(1)}?", "x", (A, B)),), origin="f[0]")
    second = Conversation((Round(f"{image_ref(0)}?", f"{image_ref(0)} is red", (A,)), Round("more", "y")), "f[1]")
    merged = Conversation.concat([first, second])
    assert [referenced_images(r.question) for r in merged.rounds] == [[1], [2], []]
    assert referenced_images(merged.rounds[1].answer) == [2]
    assert merged.members == (0, 1, 1)
    assert merged.num_images == 3 and merged.origin == "f[0] + f[1]"
    assert merged.first_rounds(2).members == (0, 1)


def test_resolve_and_check_refs():
    assert resolve_refs(f"in {image_ref(0)} and {image_ref(2)}", "image {n}") == "in image 1 and image 3"
    assert check_refs((Round(f"{image_ref(0)}", "a", (A,)),)) is None
    assert "only 1 image" in check_refs((Round(f"{image_ref(1)}", "a", (A,)),))
