// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

// Test doubles of the x402 `batch-settlement` contracts, written from the scheme's spec
// (specs/schemes/batch-settlement/scheme_batch_settlement_evm.md, x402 Foundation) and the ABI
// the reference SDK calls (x402.mechanisms.evm.batch_settlement.abi). Not the published
// contracts: only what the spec says they enforce, kept small enough to read in one sitting.
// Installed with anvil_setCode at the canonical addresses: no constructor runs, so nothing
// here is set in a constructor (constants only; the EIP-712 domain is computed per call).
//
// Also here: a Multicall3 double (tryAggregate only), which the SDK's facilitator uses to read
// channel state and which anvil does not predeploy.

interface IERC20 {
    function balanceOf(address account) external view returns (uint256);
    function transfer(address to, uint256 value) external returns (bool);
}

interface IERC3009 {
    function receiveWithAuthorization(
        address from, address to, uint256 value, uint256 validAfter, uint256 validBefore, bytes32 nonce,
        uint8 v, bytes32 r, bytes32 s
    ) external;
}

interface IERC1271 {
    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4);
}

// How the settlement contract pulls a deposit: the collector moves `amount` of `token` from
// `payer` to the settlement contract, proving the payer's consent with `data`.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external;
}

// "Channel creation and deposits": the immutable config whose EIP-712 hash is the channel id.
struct ChannelConfig {
    address payer;
    address payerAuthorizer;
    address receiver;
    address receiverAuthorizer;
    address token;
    uint40 withdrawDelay;
    bytes32 salt;
}

struct Voucher {
    ChannelConfig channel;
    uint128 maxClaimableAmount;
}

// One row of a claim: the payer's voucher and the new cumulative total the receiver claims.
struct VoucherClaim {
    Voucher voucher;
    bytes signature;
    uint128 totalClaimed;
}

library Signatures {
    // secp256k1n / 2: signatures with a higher s are malleable copies (as OpenZeppelin's ECDSA).
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    function split(bytes memory signature) internal pure returns (uint8 v, bytes32 r, bytes32 s) {
        require(signature.length == 65, "sig: length");
        assembly {
            r := mload(add(signature, 32))
            s := mload(add(signature, 64))
            v := byte(0, mload(add(signature, 96)))
        }
    }

    function recover(bytes32 digest, bytes memory signature) internal pure returns (address) {
        (uint8 v, bytes32 r, bytes32 s) = split(signature);
        if (uint256(s) > HALF_N || (v != 27 && v != 28)) return address(0);
        return ecrecover(digest, v, r, s);
    }

    // ECDSA for an EOA, ERC-1271 for a contract (OpenZeppelin SignatureChecker's rule).
    function isValidNow(address signer, bytes32 digest, bytes memory signature) internal view returns (bool) {
        if (signer == address(0)) return false;
        if (signer.code.length == 0) return recover(digest, signature) == signer;
        (bool ok, bytes memory result) =
            signer.staticcall(abi.encodeCall(IERC1271.isValidSignature, (digest, signature)));
        return ok && result.length >= 32 && abi.decode(result, (bytes4)) == IERC1271.isValidSignature.selector;
    }
}

contract X402BatchSettlementLite {
    uint40 public constant MIN_WITHDRAW_DELAY = 900; // 15 min
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000; // 30 days

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    // "Security and Trust" 3: distinct type hashes, so no signature passes for another kind.
    bytes32 private constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 private constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 private constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 private constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    struct Channel {
        uint128 balance; // deposited minus withdrawn and refunded
        uint128 totalClaimed; // cumulative, only grows, never above balance
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverTotals {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    mapping(bytes32 => Channel) public channels;
    mapping(bytes32 => PendingWithdrawal) public pendingWithdrawals;
    mapping(address => mapping(address => ReceiverTotals)) public receivers;
    mapping(bytes32 => uint256) public refundNonce;

    // The published contract uses ReentrancyGuardTransient (EIP-1153), hence the hardfork need.
    bool private transient locked;

    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed collector, uint128 amount);
    event Claimed(bytes32 indexed channelId, address indexed receiver, uint128 amount, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 nonce);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 initiatedAt);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed payer, uint128 amount);

    modifier nonReentrant() {
        require(!locked, "reentrant call");
        locked = true;
        _;
        locked = false;
    }

    // --- EIP-712 ---------------------------------------------------------------------------

    function domainSeparator() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                DOMAIN_TYPEHASH, keccak256("x402 Batch Settlement"), keccak256("1"), block.chainid, address(this)
            )
        );
    }

    function _digest(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    // "Channel creation and deposits": channelId = EIP712Hash(ChannelConfig), bound to the chain
    // and to this contract's address.
    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed
                )
            );
        }
        return _digest(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // --- Deposits --------------------------------------------------------------------------

    // "Channel creation and deposits": a channel exists from its first deposit; the collector
    // pulls the payer's tokens. Whatever the collector claims, only tokens that arrived count.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        require(amount > 0, "deposit: zero amount");
        require(
            config.withdrawDelay >= MIN_WITHDRAW_DELAY && config.withdrawDelay <= MAX_WITHDRAW_DELAY,
            "deposit: withdrawDelay out of range"
        );
        // "Authorizer roles": the receiver authorizer must not be zero.
        require(config.receiverAuthorizer != address(0), "deposit: zero receiverAuthorizer");
        bytes32 channelId = getChannelId(config);
        IERC20 token = IERC20(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        require(token.balanceOf(address(this)) - before == amount, "deposit: collector did not deliver");

        Channel storage channel = channels[channelId];
        // "Channel lifecycle events": created when the balance leaves zero with nothing claimed.
        if (channel.balance == 0 && channel.totalClaimed == 0) emit ChannelCreated(channelId, config);
        channel.balance += amount;
        emit Deposited(channelId, collector, amount);
    }

    // --- Claims and settlement -------------------------------------------------------------

    // "Claim & Settlement Strategy": claim() is for the receiver or its authorizer, row by row.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            ChannelConfig calldata config = voucherClaims[i].voucher.channel;
            require(
                msg.sender == config.receiver || msg.sender == config.receiverAuthorizer, "claim: not the receiver"
            );
            _claim(voucherClaims[i]);
        }
    }

    // "Claim & Settlement Strategy": anyone relays a batch signed (EIP-712 ClaimBatch) by the
    // receiverAuthorizer that every row shares.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        require(voucherClaims.length > 0, "claim: empty batch");
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        for (uint256 i = 1; i < voucherClaims.length; i++) {
            require(
                voucherClaims[i].voucher.channel.receiverAuthorizer == authorizer, "claim: mixed receiverAuthorizer"
            );
        }
        require(
            Signatures.isValidNow(authorizer, getClaimBatchDigest(voucherClaims), authorizerSignature),
            "claim: bad authorizer signature"
        );
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            _claim(voucherClaims[i]);
        }
    }

    function _claim(VoucherClaim calldata c) private {
        ChannelConfig calldata config = c.voucher.channel;
        bytes32 channelId = getChannelId(config);
        bytes32 digest = getVoucherDigest(channelId, c.voucher.maxClaimableAmount);
        // "Authorizer roles": an EOA payerAuthorizer signs (ECDSA only); when it is zero the payer
        // signs, ERC-1271 for a smart wallet.
        bool signed = config.payerAuthorizer != address(0)
            ? Signatures.recover(digest, c.signature) == config.payerAuthorizer
            : Signatures.isValidNow(config.payer, digest, c.signature);
        require(signed, "claim: bad voucher signature");

        Channel storage channel = channels[channelId];
        // "Requests and vouchers": the voucher is a cumulative ceiling; claims never pass it,
        // never pass the channel's balance, and totalClaimed only grows.
        require(c.totalClaimed <= c.voucher.maxClaimableAmount, "claim: above the voucher");
        require(c.totalClaimed <= channel.balance, "claim: above the balance");
        require(c.totalClaimed >= channel.totalClaimed, "claim: below totalClaimed");
        uint128 increase = c.totalClaimed - channel.totalClaimed;
        if (increase == 0) return; // "Cooperative refund flow" 4: re-claiming the claimed total is a no-op
        channel.totalClaimed = c.totalClaimed;
        receivers[config.receiver][config.token].totalClaimed += increase;
        emit Claimed(channelId, config.receiver, increase, c.totalClaimed);
    }

    // "Claim and settle": sweep everything claimed and not yet settled in one transfer;
    // permissionless, the tokens can only go to the receiver.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverTotals storage totals = receivers[receiver][token];
        uint128 amount = totals.totalClaimed - totals.totalSettled;
        totals.totalSettled = totals.totalClaimed;
        if (amount > 0) require(IERC20(token).transfer(receiver, amount), "settle: transfer failed");
        emit Settled(receiver, token, msg.sender, amount);
    }

    // --- Refunds ---------------------------------------------------------------------------

    // "Refund and withdrawal": direct cooperative refund by the receiver side.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        require(msg.sender == config.receiver || msg.sender == config.receiverAuthorizer, "refund: not the receiver");
        _refund(config, getChannelId(config), amount);
    }

    // "Refund and withdrawal" and Verification Rule 11: relayed refund signed by the
    // receiverAuthorizer for the channel's current refund nonce.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 channelId = getChannelId(config);
        require(nonce == refundNonce[channelId], "refund: wrong nonce");
        require(
            Signatures.isValidNow(
                config.receiverAuthorizer, getRefundDigest(channelId, nonce, amount), receiverAuthorizerSignature
            ),
            "refund: bad authorizer signature"
        );
        _refund(config, channelId, amount);
    }

    // The nonce advances first, even when nothing is left to refund; the amount is capped to
    // the unclaimed escrow; a pending withdrawal shrinks by what was refunded.
    function _refund(ChannelConfig calldata config, bytes32 channelId, uint128 amount) private {
        uint256 nonce = refundNonce[channelId]++;
        Channel storage channel = channels[channelId];
        uint128 available = channel.balance - channel.totalClaimed;
        uint128 actual = amount < available ? amount : available;
        if (actual == 0) return;
        channel.balance -= actual;
        PendingWithdrawal storage pending = pendingWithdrawals[channelId];
        if (pending.initiatedAt != 0) {
            if (actual >= pending.amount) delete pendingWithdrawals[channelId];
            else pending.amount -= actual;
        }
        require(IERC20(config.token).transfer(config.payer, actual), "refund: transfer failed");
        emit Refunded(channelId, config.payer, actual, nonce);
        _closeIfDrained(channelId, config);
    }

    // --- Timed withdrawal (the payer's escape hatch) ---------------------------------------

    // "Refund and withdrawal": payer or payerAuthorizer; at most the unclaimed escrow.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        _onlyPayer(config);
        bytes32 channelId = getChannelId(config);
        Channel storage channel = channels[channelId];
        require(amount > 0, "withdraw: zero amount");
        require(amount <= channel.balance - channel.totalClaimed, "withdraw: above unclaimed escrow");
        require(pendingWithdrawals[channelId].initiatedAt == 0, "withdraw: already pending");
        pendingWithdrawals[channelId] = PendingWithdrawal(amount, uint40(block.timestamp));
        emit WithdrawInitiated(channelId, amount, uint40(block.timestamp));
    }

    // After withdrawDelay; pays what is still unclaimed (the receiver may have claimed meanwhile).
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        _onlyPayer(config);
        bytes32 channelId = getChannelId(config);
        PendingWithdrawal memory pending = pendingWithdrawals[channelId];
        require(pending.initiatedAt != 0, "withdraw: none pending");
        require(block.timestamp >= uint256(pending.initiatedAt) + config.withdrawDelay, "withdraw: delay not over");
        delete pendingWithdrawals[channelId];
        Channel storage channel = channels[channelId];
        uint128 available = channel.balance - channel.totalClaimed;
        uint128 actual = pending.amount < available ? pending.amount : available;
        channel.balance -= actual;
        if (actual > 0) require(IERC20(config.token).transfer(config.payer, actual), "withdraw: transfer failed");
        emit WithdrawFinalized(channelId, config.payer, actual);
        _closeIfDrained(channelId, config);
    }

    function _onlyPayer(ChannelConfig calldata config) private view {
        require(msg.sender == config.payer || msg.sender == config.payerAuthorizer, "withdraw: not the payer");
    }

    // "Channel lifecycle events": closed when the escrow is empty and nothing was claimed.
    function _closeIfDrained(bytes32 channelId, ChannelConfig calldata config) private {
        Channel storage channel = channels[channelId];
        if (channel.balance == 0 && channel.totalClaimed == 0) emit ChannelClosed(channelId, config);
    }

    // --- Batching --------------------------------------------------------------------------

    // The SDK's refund sends multicall[claimWithSignature, refundWithSignature]: each call runs
    // in this contract's context, and any revert undoes the whole batch.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory result) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly {
                    revert(add(result, 32), mload(result))
                }
            }
            results[i] = result;
        }
    }
}

// Pulls an EIP-3009 deposit: the payer signed ReceiveWithAuthorization(payer -> this collector)
// with nonce keccak256(abi.encode(channelId, salt)), so the signature is good for one channel only
// and only this collector can redeem it; the tokens go straight on to the settlement contract.
contract ERC3009DepositCollectorLite {
    address public constant SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        require(msg.sender == SETTLEMENT, "collector: only the settlement contract");
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        (uint8 v, bytes32 r, bytes32 s) = Signatures.split(signature);
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009(token).receiveWithAuthorization(payer, address(this), amount, validAfter, validBefore, nonce, v, r, s);
        require(IERC20(token).transfer(SETTLEMENT, amount), "collector: transfer failed");
    }
}

interface IPermit2SignatureTransfer {
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

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

// Pulls a Permit2 deposit: the payer signed PermitWitnessTransferFrom with this collector as
// spender and the witness DepositWitness(channelId), so the signature is good for one channel
// only; Permit2 sends the tokens straight to the settlement contract. The optional EIP-2612
// permit segment (gasless Permit2 approval) is not supported: the payer approves Permit2 itself.
contract Permit2DepositCollectorLite {
    address public constant SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;
    bytes32 private constant DEPOSIT_WITNESS_TYPEHASH = keccak256("DepositWitness(bytes32 channelId)");
    // EIP-712 lists referenced types alphabetically: DepositWitness before TokenPermissions.
    string private constant WITNESS_TYPE_STRING =
        "DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)";

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        require(msg.sender == SETTLEMENT, "collector: only the settlement contract");
        (uint256 nonce, uint256 deadline, bytes memory signature, bytes memory eip2612Permit) =
            abi.decode(collectorData, (uint256, uint256, bytes, bytes));
        require(eip2612Permit.length == 0, "collector: EIP-2612 permit not supported by this double");
        IPermit2SignatureTransfer(PERMIT2).permitWitnessTransferFrom(
            IPermit2SignatureTransfer.PermitTransferFrom(
                IPermit2SignatureTransfer.TokenPermissions(token, amount), nonce, deadline
            ),
            IPermit2SignatureTransfer.SignatureTransferDetails(SETTLEMENT, amount),
            payer,
            keccak256(abi.encode(DEPOSIT_WITNESS_TYPEHASH, channelId)),
            WITNESS_TYPE_STRING,
            signature
        );
    }
}

// Multicall3's tryAggregate (the SDK reads channel state through it at its canonical address).
contract Multicall3Lite {
    struct Call {
        address target;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function tryAggregate(bool requireSuccess, Call[] calldata calls) external payable returns (Result[] memory out) {
        out = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool ok, bytes memory data) = calls[i].target.call(calls[i].callData);
            require(ok || !requireSuccess, "Multicall3: call failed");
            out[i] = Result(ok, data);
        }
    }
}
