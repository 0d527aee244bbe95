// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

// Test doubles of Permit2's signature transfers and of x402's two Permit2 proxies, written from
// their public interfaces so that tests can place them (anvil_setCode) at the canonical
// addresses the x402 SDKs use. They keep no state set by a constructor: runtime code only.

interface IERC20Like {
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

struct TokenPermissions {
    address token;
    uint256 amount;
}

struct PermitTransferFrom {
    TokenPermissions permitted;
    uint256 nonce;
    uint256 deadline;
}

struct SignatureTransferDetails {
    address to;
    uint256 requestedAmount;
}

/// @notice Permit2's `permitWitnessTransferFrom` with unordered (bitmap) nonces.
contract Permit2Lite {
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,uint256 chainId,address verifyingContract)");
    bytes32 private constant TOKEN_PERMISSIONS_TYPEHASH =
        keccak256("TokenPermissions(address token,uint256 amount)");
    string private constant WITNESS_STUB =
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,";

    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;

    event UnorderedNonceInvalidation(address indexed owner, uint256 word, uint256 mask);

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, keccak256("Permit2"), block.chainid, address(this)));
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external {
        require(block.timestamp <= permit.deadline, "Permit2: signature expired");
        require(transferDetails.requestedAmount <= permit.permitted.amount, "Permit2: amount too high");
        _useNonce(owner, permit.nonce);
        bytes32 typeHash = keccak256(abi.encodePacked(WITNESS_STUB, witnessTypeString));
        bytes32 permitted = keccak256(abi.encode(TOKEN_PERMISSIONS_TYPEHASH, permit.permitted));
        bytes32 dataHash =
            keccak256(abi.encode(typeHash, permitted, msg.sender, permit.nonce, permit.deadline, witness));
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), dataHash));
        require(_recover(digest, signature) == owner, "Permit2: invalid signature");
        require(
            IERC20Like(permit.permitted.token).transferFrom(owner, transferDetails.to, transferDetails.requestedAmount),
            "Permit2: transfer failed"
        );
    }

    function _useNonce(address owner, uint256 nonce) private {
        uint256 word = nonce >> 8;
        uint256 bit = 1 << (nonce & 0xff);
        uint256 flipped = nonceBitmap[owner][word] ^= bit;
        require(flipped & bit != 0, "Permit2: nonce used");
        emit UnorderedNonceInvalidation(owner, word, bit);
    }

    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address) {
        require(signature.length == 65, "Permit2: invalid signature length");
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        require(uint256(s) <= 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0, "Permit2: invalid s");
        address signer = ecrecover(digest, v, r, s);
        require(signer != address(0), "Permit2: invalid signature");
        return signer;
    }
}

address constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;

/// @notice x402's exact proxy: pays exactly the permitted amount to the signed recipient.
contract X402ExactPermit2ProxyLite {
    struct Witness {
        address to;
        uint256 validAfter;
    }

    bytes32 private constant WITNESS_TYPEHASH = keccak256("Witness(address to,uint256 validAfter)");
    string private constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)";

    function settle(PermitTransferFrom calldata permit, address owner, Witness calldata witness, bytes calldata signature)
        external
    {
        require(block.timestamp >= witness.validAfter, "x402: not yet valid");
        Permit2Lite(PERMIT2).permitWitnessTransferFrom(
            permit,
            SignatureTransferDetails(witness.to, permit.permitted.amount),
            owner,
            keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.validAfter)),
            WITNESS_TYPE_STRING,
            signature
        );
    }
}

/// @notice x402's upto proxy: the named facilitator pays any amount up to the permitted one.
contract X402UptoPermit2ProxyLite {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    bytes32 private constant WITNESS_TYPEHASH =
        keccak256("Witness(address to,address facilitator,uint256 validAfter)");
    string private constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    function settle(
        PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        require(msg.sender == witness.facilitator, "x402: not the facilitator");
        require(block.timestamp >= witness.validAfter, "x402: not yet valid");
        Permit2Lite(PERMIT2).permitWitnessTransferFrom(
            permit,
            SignatureTransferDetails(witness.to, amount),
            owner,
            keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter)),
            WITNESS_TYPE_STRING,
            signature
        );
    }
}
